"""Ray Data stages and storage I/O; knows nothing of diffusion internals."""
