"""The face of rpt-pipeline: the `rpt` command line (`app/cli.py`) and the Prefect flows
(`app/flows.py`). Both hand this project's stage registry (`stages.REGISTRY`) to the framework; nothing
in `pipeline/`, `stages/` or the libraries imports them."""
