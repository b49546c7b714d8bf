# Developer shortcuts. The README's two commands are the supported entry points.
.PHONY: protos test lint

protos:  ## regenerate snapshotter/api/ from protos/*.proto
	python3 protos/generate.py

test:
	python3 -m pytest -q

lint:
	ruff check .
