"""One module per stage. Each defines `Config` (its config section) and `STAGE` (a pipeline.stage.Stage).
Stages never import each other; they share only `pipeline/` and the artifacts."""
