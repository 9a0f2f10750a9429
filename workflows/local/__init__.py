"""Running the pipeline on one machine: nothing here goes into the phase images or runs on a cluster.

- `runner` executes the rendered WorkflowTemplate (`workflows/pipeline.yaml`) as local processes (`steps`), or each
  step in its phase image (`containers`);
- `s3` serves a local folder as S3 (rclone), optionally behind `fault_proxy`; `loopback` and `signals` are
  what these servers share (free ports, clean shutdown);
- `tinker` is the stand-in for the hosted Tinker API, backed by the local engine (`python -m workflows.local.tinker`).
"""
