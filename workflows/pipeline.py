"""The pipeline DAG, once, in Hera: an Argo WorkflowTemplate whose steps run `python -m jobs <phase>`.

`python -m workflows.pipeline` prints the rendered YAML; `workflows/pipeline.yaml` is that output,
committed, and a test fails when the two drift. The local runner (`workflows.runner`) executes the
same rendered file, so `make run` and the cluster run one DAG.
"""

from __future__ import annotations

from hera.workflows import (
    DAG,
    ConfigMapEnv,
    Container,
    EmptyDirVolume,
    Env,
    Parameter,
    RetryStrategy,
    SecretEnv,
    WorkflowTemplate,
    models,
)

from jobs import __version__
from jobs.phases import PHASES

NAME = "distill"
OUTPUTS = "/tmp/outputs"
# every phase runs in its own image `<registry>/<phase>:<tag>`; these drive a model and get engine resources
ENGINE_PHASES = {"preflight", "teacher", "train", "evaluate", "export"}
# figures each step exposes as output parameters (shown in the Argo UI); all are keys of the phase's metrics
FIGURES = {"ingest": ("prompts", "shards"), "audit": ("kept", "dropped"), "train": ("first_loss", "last_loss"),
           "evaluate": ("similarity_student", "token_reduction", "cost_ratio"), "publish": ("mode", "files")}
ENGINE_RESOURCES = models.ResourceRequirements(requests={"cpu": "2", "memory": "4Gi"}, limits={"memory": "8Gi"})
LIGHT_RESOURCES = models.ResourceRequirements(requests={"cpu": "250m", "memory": "512Mi"}, limits={"memory": "2Gi"})

ENV = [
    ConfigMapEnv(name="DISTILL_S3_ENDPOINT", config_map_name="distill-config", config_map_key="s3-endpoint"),
    ConfigMapEnv(name="DISTILL_S3_BUCKET", config_map_name="distill-config", config_map_key="s3-bucket"),
    SecretEnv(name="AWS_ACCESS_KEY_ID", secret_name="distill-s3", secret_key="access-key"),
    SecretEnv(name="AWS_SECRET_ACCESS_KEY", secret_name="distill-s3", secret_key="secret-key"),
    SecretEnv(name="HF_TOKEN", secret_name="distill-hub", secret_key="token", optional=True),
    SecretEnv(name="TINKER_API_KEY", secret_name="distill-tinker", secret_key="api-key", optional=True),
    Env(name="DISTILL_OUTPUTS_DIR", value=OUTPUTS),
    Env(name="DISTILL_CACHE_DIR", value="/cache"),
    Env(name="DISTILL_SCRATCH", value="/tmp"),
    Env(name="HOME", value="/tmp"),
]
SECURITY = models.SecurityContext(run_as_non_root=True, read_only_root_filesystem=True,
                                  allow_privilege_escalation=False,
                                  capabilities=models.Capabilities(drop=["ALL"]))
# retry what may be transient (a lost pod, a flaky endpoint), never bad input: jobs exits 2 for that
RETRY = RetryStrategy(limit="2", retry_policy="Always", expression="asInt(lastRetry.exitCode) != 2",
                      backoff=models.Backoff(duration="10s", factor="2"))


def phase_template(phase: str, inputs: list[Parameter] | None = None, extra_args: list[str] | None = None) -> Container:
    return Container(
        name=phase,
        image=f"{{{{workflow.parameters.image-registry}}}}/{phase}:{{{{workflow.parameters.image-tag}}}}",
        command=["python", "-m", "jobs"],
        args=[phase, "--profile", "{{workflow.parameters.profile}}", "--run-id", "{{workflow.parameters.run-id}}",
              "--config-yaml", "{{workflow.parameters.config}}", *(extra_args or [])],
        inputs=inputs or [],
        outputs=[Parameter(name=f.replace("_", "-"), value_from=models.ValueFrom(path=f"{OUTPUTS}/{f}", default=""))
                 for f in FIGURES.get(phase, ())],
        env=ENV,
        resources=ENGINE_RESOURCES if phase in ENGINE_PHASES else LIGHT_RESOURCES,
        security_context=SECURITY,
        volume_mounts=[models.VolumeMount(name="tmp", mount_path="/tmp"),
                       models.VolumeMount(name="cache", mount_path="/cache")],
        retry_strategy=RETRY,
    )


def build() -> WorkflowTemplate:
    with WorkflowTemplate(
        name=NAME,
        entrypoint="pipeline",
        service_account_name="distill-workflow",
        arguments=[
            Parameter(name="run-id", description="run id: artifacts go to runs/<run-id>/ (required)"),
            Parameter(name="profile", value="demo", enum=["demo", "ci", "full"]),
            Parameter(name="config", value="{}", description="YAML merged over the profile"),
            Parameter(name="image-registry", value="localhost/distill"),
            Parameter(name="image-tag", value=__version__),
        ],
        pod_metadata=models.Metadata(labels={"distill.run-id": "{{workflow.parameters.run-id}}"}),
        security_context=models.PodSecurityContext(run_as_non_root=True, run_as_user=10001, fs_group=10001,
                                                   seccomp_profile=models.SeccompProfile(type="RuntimeDefault")),
        volumes=[EmptyDirVolume(name="tmp"), EmptyDirVolume(name="cache")],
    ) as template:
        steps = {phase: phase_template(phase) for phase in PHASES if phase != "teacher"}
        teacher = phase_template("teacher", inputs=[Parameter(name="shard")],
                                 extra_args=["--shard", "{{inputs.parameters.shard}}"])
        with DAG(name="pipeline"):
            preflight, ingest = steps["preflight"](), steps["ingest"]()
            shards = teacher(name="teacher", arguments={"shard": "{{item}}"},
                             with_param="{{tasks.ingest.outputs.parameters.shards}}")
            preflight >> ingest >> shards
            previous = shards
            for phase in ("student", "audit", "split", "train", "evaluate", "report", "export", "publish"):
                task = steps[phase]()
                previous >> task
                previous = task
    return template


def render() -> str:
    return build().to_yaml()


if __name__ == "__main__":
    print(render(), end="")
