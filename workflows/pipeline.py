"""The pipeline DAG, once, in Hera: an Argo WorkflowTemplate whose steps run `python -m jobs <phase>`.

`python -m workflows.pipeline` prints the rendered YAML; `workflows/pipeline.yaml` is that output,
committed, and a test fails when the two drift. The local runner (`workflows.local.runner`) executes the
same rendered file, so `make run` and the cluster run one DAG.
"""

from __future__ import annotations

from hera.workflows import (
    DAG,
    ConfigMapEnv,
    Container,
    Counter,
    EmptyDirVolume,
    Env,
    Gauge,
    Histogram,
    Label,
    Parameter,
    RetryStrategy,
    SecretEnv,
    Task,
    WorkflowTemplate,
    models,
)

from jobs import __version__
from jobs.config import PROFILES
from jobs.errors import InputError
from jobs.phases import PHASE, TABLE, Phase
from jobs.run_options import BACKEND_CHOICES

NAME = "distill"
OUTPUTS = "/tmp/outputs"
# every phase runs in its own image `<registry>/<phase>:<tag>`; phases that drive a model get engine resources
ENGINE_RESOURCES = models.ResourceRequirements(requests={"cpu": "2", "memory": "4Gi"}, limits={"memory": "8Gi"})
LIGHT_RESOURCES = models.ResourceRequirements(requests={"cpu": "250m", "memory": "512Mi"}, limits={"memory": "2Gi"})

ENV = [
    ConfigMapEnv(name="DISTILL_S3_ENDPOINT", config_map_name="distill-config", config_map_key="s3-endpoint"),
    ConfigMapEnv(name="DISTILL_S3_BUCKET", config_map_name="distill-config", config_map_key="s3-bucket"),
    SecretEnv(name="AWS_ACCESS_KEY_ID", secret_name="distill-s3", secret_key="access-key"),
    SecretEnv(name="AWS_SECRET_ACCESS_KEY", secret_name="distill-s3", secret_key="secret-key"),
    SecretEnv(name="HF_TOKEN", secret_name="distill-hub", secret_key="token", optional=True),
    SecretEnv(name="TINKER_API_KEY", secret_name="distill-tinker", secret_key="api-key", optional=True),
    ConfigMapEnv(name="TINKER_BASE_URL", config_map_name="distill-config", config_map_key="tinker-base-url",
                 optional=True),
    Env(name="TINKER_TELEMETRY", value="0"),
    Env(name="DISTILL_OUTPUTS_DIR", value=OUTPUTS),
    Env(name="DISTILL_CACHE_DIR", value="/cache"),
    Env(name="DISTILL_SCRATCH", value="/tmp"),
    Env(name="HOME", value="/tmp"),
    Env(name="HF_HUB_DISABLE_PROGRESS_BARS", value="1"),  # pod logs are JSON lines, not terminal bars
]
SECURITY = models.SecurityContext(run_as_non_root=True, read_only_root_filesystem=True,
                                  allow_privilege_escalation=False,
                                  capabilities=models.Capabilities(drop=["ALL"]))
# monitoring: Argo's controller exports these (prefixed `argo_workflows_`) to Prometheus. Labels stay low-cardinality
# (phase, profile, status; never the run id, which the pods carry as a label instead). Metrics with one name keep
# one help text and one label set everywhere, as Prometheus requires.
ARTIFACT_REPOSITORY = models.ArtifactRepositoryRef(config_map="distill-artifact-repository", key="default")
DURATION_BUCKETS = (10.0, 30.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0, 14400.0)
# gauges set from a phase's output parameters once it has succeeded: metric name -> (phase, output parameter, help)
FIGURE_GAUGES = {
    "distill_train_final_loss": ("train", "last-loss", "Training loss of the last step of the last run"),
    "distill_eval_similarity": ("evaluate", "similarity-student", "Student-teacher reply similarity of the last run"),
    "distill_eval_token_reduction": ("evaluate", "token-reduction",
                                     "Share of prompt tokens the student saves per request, last run"),
}


def phase_metrics(phase: str) -> list:
    labels = [Label(key="phase", value=phase), Label(key="profile", value="{{workflow.parameters.profile}}")]
    status = [*labels, Label(key="status", value="{{status}}")]
    metrics = [
        Histogram(name="distill_step_duration_seconds", help="Duration of a pipeline step in seconds",
                  labels=status, buckets=list(DURATION_BUCKETS), value="{{duration}}"),
        Counter(name="distill_step_total", help="Pipeline steps finished, by phase and status", labels=status,
                value="1"),
    ]
    metrics += [Gauge(name=name, help=text, labels=labels, when="{{status}} == Succeeded", realtime=False,
                      value=f"{{{{outputs.parameters.{parameter}}}}}")
                for name, (owner, parameter, text) in FIGURE_GAUGES.items() if owner == phase]
    return metrics


WORKFLOW_METRICS = [
    Gauge(name="distill_run_duration_seconds", help="Duration of the last pipeline run in seconds",
          labels=[Label(key="profile", value="{{workflow.parameters.profile}}")], realtime=False,
          value="{{workflow.duration}}"),
    Counter(name="distill_run_total", help="Pipeline runs finished, by status",
            labels=[Label(key="profile", value="{{workflow.parameters.profile}}"),
                    Label(key="status", value="{{workflow.status}}")], value="1"),
]

# retry what may be transient, never bad input: a transient fault exits 75 (jobs.errors.TransientError), and a
# lost pod, an OOM kill or an unexpected crash may pass too; bad input exits 2 and would only fail again
RETRY = RetryStrategy(limit="2", retry_policy="Always",
                      expression=f"asInt(lastRetry.exitCode) != {InputError.exit_code}",
                      backoff=models.Backoff(duration="10s", factor="2"))


def phase_template(phase: Phase) -> Container:
    shard = [Parameter(name="shard")] if phase.sharded else []
    return Container(
        name=phase.name,
        image=f"{{{{workflow.parameters.image-registry}}}}/{phase.name}:{{{{workflow.parameters.image-tag}}}}",
        command=["python", "-m", "jobs"],
        args=[phase.name, "--profile", "{{workflow.parameters.profile}}", "--run-id", "{{workflow.parameters.run-id}}",
              "--config-yaml", "{{workflow.parameters.config}}", "--backend", "{{workflow.parameters.backend}}",
              *(["--shard", "{{inputs.parameters.shard}}"] if phase.sharded else [])],
        inputs=shard,
        outputs=[Parameter(name=f.replace("_", "-"), value_from=models.ValueFrom(path=f"{OUTPUTS}/{f}", default=""))
                 for f in phase.figures],
        env=ENV,
        resources=ENGINE_RESOURCES if phase.engine else LIGHT_RESOURCES,
        security_context=SECURITY,
        volume_mounts=[models.VolumeMount(name="tmp", mount_path="/tmp"),
                       models.VolumeMount(name="cache", mount_path="/cache")],
        retry_strategy=RETRY,
        metrics=phase_metrics(phase.name),
    )


def ancestors(name: str) -> set[str]:
    needs = PHASE[name].needs
    return set(needs).union(*(ancestors(need) for need in needs))


def direct_needs(phase: Phase) -> list[str]:
    """The phases it needs, less those another of them already needs: the DAG's edges without shortcuts."""
    return [need for need in phase.needs if not any(need in ancestors(other) for other in phase.needs)]


def build() -> WorkflowTemplate:
    with WorkflowTemplate(
        name=NAME,
        entrypoint="pipeline",
        service_account_name="distill-workflow",
        arguments=[
            Parameter(name="run-id", description="run id: artifacts go to runs/<run-id>/ (required)"),
            Parameter(name="profile", value="demo", enum=list(PROFILES)),
            Parameter(name="config", value="{}", description="YAML merged over the profile"),
            Parameter(name="backend", value="", enum=list(BACKEND_CHOICES),
                      description="model.backend for every phase; empty: the profile's and config's"),
            Parameter(name="image-registry", value="localhost/distill"),
            Parameter(name="image-tag", value=__version__),
        ],
        pod_metadata=models.Metadata(labels={"distill.run-id": "{{workflow.parameters.run-id}}"}),
        security_context=models.PodSecurityContext(run_as_non_root=True, run_as_user=10001, fs_group=10001,
                                                   seccomp_profile=models.SeccompProfile(type="RuntimeDefault")),
        volumes=[EmptyDirVolume(name="tmp"), EmptyDirVolume(name="cache")],
        # every step's logs go to the artifact repository the chart configures (`distill-artifact-repository`)
        archive_logs=True,
        artifact_repository_ref=ARTIFACT_REPOSITORY,
        metrics=WORKFLOW_METRICS,
    ) as template:
        # the phase that lists the shards a sharded phase fans out over
        shards_from = next(phase.name for phase in TABLE if "shards" in phase.figures)
        templates = {phase.name: phase_template(phase) for phase in TABLE}
        with DAG(name="pipeline"):
            tasks: dict[str, Task] = {}
            for phase in TABLE:
                make = templates[phase.name]
                task = make(
                    name=phase.name, arguments={"shard": "{{item}}"},
                    with_param=f"{{{{tasks.{shards_from}.outputs.parameters.shards}}}}") if phase.sharded else make()
                assert isinstance(task, Task), "a template called inside a DAG context makes a Task"
                tasks[phase.name] = task
                for need in direct_needs(phase):
                    tasks[need] >> tasks[phase.name]
    return template


def render() -> str:
    return build().to_yaml()


if __name__ == "__main__":
    print(render(), end="")
