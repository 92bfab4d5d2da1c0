"""The software version written into records' dataset columns and manifests (no heavy imports)."""
CODEC_VERSION = "0.1.0"
