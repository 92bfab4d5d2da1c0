"""Thin CLI entry points (`fcodec <job>`), one file per job, over codec/ and pipeline/."""
