"""Loads this folder's jsonl files as lm-eval datasets (paths relative to this file, any cwd)."""

import os

import datasets

HERE = os.path.dirname(os.path.abspath(__file__))


def load_jsonl(*args, file: str = "", **kwargs) -> datasets.DatasetDict:
    """``{"test": Dataset}`` from ``HERE/file`` (extra kwargs come from lm-eval's metadata)."""
    return datasets.DatasetDict({"test": datasets.Dataset.from_json(os.path.join(HERE, file))})
