"""Fixtures shared by the pipeline tests."""

from __future__ import annotations

import pytest


def _ingest_to(input_path, output_dir, cfg=None):
    """Run the ingest stage and return the table it wrote."""
    from pipeline import ingest
    from pipeline.backend import read_folder

    ingest.main(cfg or ingest.IngestConfig(), input_path, output_dir, progress=False)
    return read_folder(output_dir)


@pytest.fixture(scope="session")
def ingest_to():
    """`ingest_to(input, output, cfg=None) -> table`: ingest a folder or manifest, read it back."""
    return _ingest_to
