"""The export job: merge adapters into their base, optionally quantize, publish a checkpoint.

`plan_export` runs in the API request: it resolves the references, checks
artifact types, parameters and base compatibility, and returns the job's
inputs (digests, weights) and parameters, so a request that cannot succeed
is refused before any work. `run_export` is the handler a worker runs.

The output is published to the first adapter's repository with `subject`
set to that adapter, and the manifest put and the job's completion happen
in one transaction that first checks the worker still holds the lease: a
worker that lost its job can never publish a second artifact.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    WithJsonSchema,
    field_validator,
    model_validator,
)
from sqlalchemy.orm import Session

from peftreg.checkpoint.package import (
    CheckpointConfig,
    CheckpointPackage,
    SourceArtifact,
    build_checkpoint_package,
    library_versions,
)
from peftreg.digest import Digest
from peftreg.gguf.errors import GgufUnsupported
from peftreg.gguf.formats import GGUF_QUANTIZATIONS, check_gguf_architecture
from peftreg.manifest import OCI_MANIFEST
from peftreg.reference import REFERENCE_SCHEMA_PATTERN, Reference
from peftreg.registry.auth.scopes import Grant, Principal
from peftreg.registry.catalog import blobs, manifests
from peftreg.registry.errors import BaseIncompatible, BlobUnknown, JobInvalid, NameUnknown
from peftreg.registry.jobs.context import JobContext
from peftreg.registry.jobs.sources import (
    AdapterArtifact,
    BaseArtifact,
    CalibrationArtifact,
    load_adapter,
    load_base,
    load_calibration,
    materialize,
    parse_reference,
)
from peftreg.registry.state import Services
from peftreg.sdk.errors import InvalidRequest

if TYPE_CHECKING:  # the API plans exports without torch; the worker computes with it
    from peftreg.checkpoint.encoding import TensorEncoder

EXPORT = "export"
CALIBRATED = ("gptq", "awq")  # INT4 algorithms that need calibration text (llm-compressor)
DEFAULT_CALIBRATION_SAMPLES = 128  # as peftreg.quantize.calibrated, which imports torch
DEFAULT_MAX_SEQUENCE_LENGTH = 512


def _reference_text(text: str) -> str:
    Reference.parse(text)  # InvalidReference is a ValueError: a 400 INVALID_REQUEST
    return text


# A reference as the client wrote it; checked whole, documented by its pattern.
ReferenceText = Annotated[
    str,
    AfterValidator(_reference_text),
    WithJsonSchema({"type": "string", "pattern": REFERENCE_SCHEMA_PATTERN}),
]


class AdapterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reference: ReferenceText
    weight: float = Field(default=1.0, allow_inf_nan=False)


class ExportRequest(BaseModel):
    """What a client asks for; references are `repo:tag` or `repo@digest`."""

    model_config = ConfigDict(extra="forbid")

    adapters: list[AdapterRequest] = Field(min_length=1, max_length=16)
    base: ReferenceText
    dtype: Literal["float16", "bfloat16", "float32"] | None = None
    base_quantization: Literal["none", "nf4"] = "none"
    format: Literal["safetensors", "gguf"] = "safetensors"
    quantize: Literal["none", "int4", "f16", "q8_0", "q4_0", "q4_k_m"] = "none"
    group_size: int = 128
    algorithm: Literal["rtn", "mse", "gptq", "awq"] = "rtn"
    calibration: ReferenceText | None = None
    calibration_samples: int = Field(default=DEFAULT_CALIBRATION_SAMPLES, ge=1, le=4096)
    max_sequence_length: int = Field(default=DEFAULT_MAX_SEQUENCE_LENGTH, ge=16, le=32768)

    @model_validator(mode="after")
    def _calibration(self) -> ExportRequest:
        if self.algorithm in CALIBRATED:
            if self.quantize != "int4" or self.format != "safetensors":
                raise ValueError(f"algorithm {self.algorithm} applies to quantize int4 only")
            if self.calibration is None:
                raise ValueError(
                    f"algorithm {self.algorithm} needs calibration: the reference of a text or "
                    "JSONL artifact"
                )
        elif self.calibration is not None:
            raise ValueError("calibration applies to algorithm gptq or awq only")
        return self

    @model_validator(mode="after")
    def _format(self) -> ExportRequest:
        if self.format == "gguf":
            if self.quantize == "none":
                self.quantize = "f16"
            if self.quantize not in GGUF_QUANTIZATIONS:
                raise ValueError(
                    f"format gguf takes quantize {', '.join(GGUF_QUANTIZATIONS)}, not "
                    f"{self.quantize}"
                )
            if self.dtype is not None:
                raise ValueError("format gguf sets tensor types with quantize, not dtype")
        elif self.quantize not in ("none", "int4"):
            raise ValueError(f"quantize {self.quantize} is a GGUF type: set format gguf")
        return self

    @field_validator("group_size")
    @classmethod
    def _group_size(cls, value: int) -> int:
        if value < 8 or value % 8:
            raise ValueError("group_size must be a positive multiple of 8")
        return value

    def params(self) -> dict[str, Any]:
        """The parameters that change the output (part of the idempotency key)."""
        params: dict[str, Any] = {
            "merge": True,
            "dtype": self.dtype,
            "base_quantization": self.base_quantization,
            "quantize": self.quantize,
        }
        if self.quantize == "int4":
            params |= {"group_size": self.group_size, "algorithm": self.algorithm}
        if self.algorithm in CALIBRATED:  # absent otherwise: earlier jobs keep their keys
            params |= {
                "calibration_samples": self.calibration_samples,
                "max_sequence_length": self.max_sequence_length,
            }
        if self.format == "gguf":  # absent for safetensors: earlier jobs keep their keys
            params["format"] = "gguf"
        return params


@dataclass(frozen=True)
class PlannedExport:
    inputs: dict[str, Any]
    params: dict[str, Any]
    repository: str


def _merge_inputs(adapters: list[tuple[AdapterArtifact, float]]) -> list[Any]:
    from peftreg.merge.inputs import AdapterInput

    return [
        AdapterInput(
            config=adapter.config,
            tensors_path=Path(adapter.repository),  # not read: the check needs configs only
            weight=weight,
            digest=adapter.digest,
            label=f"{adapter.repository}@{adapter.digest}",
        )
        for adapter, weight in adapters
    ]


def check_sources(
    base: BaseArtifact, adapters: list[tuple[AdapterArtifact, float]], base_quantization: str
) -> None:
    """Refuse, before any work, a merge that cannot be right."""
    from peftreg.merge.compat import check_compatible
    from peftreg.merge.errors import IncompatibleBase

    for adapter, _ in adapters:
        if base_quantization == "nf4" and adapter.config.base.quantization != "nf4":
            raise JobInvalid(
                f"{adapter.repository}@{adapter.digest} was not trained against an NF4 base "
                f"(its manifest says {adapter.config.base.quantization!r}); merge it without "
                "base_quantization=nf4"
            )
    try:
        check_compatible(base.config, _merge_inputs(adapters))
    except IncompatibleBase as exc:
        raise BaseIncompatible(
            str(exc),
            detail={
                "base": f"{base.repository}@{base.digest}",
                "base_fingerprint": base.config.fingerprint,
                "adapter_fingerprints": [a.config.base.fingerprint for a, _ in adapters],
            },
        ) from None
    except InvalidRequest as exc:
        raise JobInvalid(str(exc)) from None


def export_access(request: ExportRequest) -> tuple[list[str], str]:
    """(repositories read, repository written) by a request, from its references alone."""
    sources = [parse_reference(item.reference) for item in request.adapters]
    reads = {parse_reference(request.base).repository, *(ref.repository for ref in sources)}
    if request.calibration is not None:
        reads.add(parse_reference(request.calibration).repository)
    return sorted(reads), sources[0].repository


def plan_export(session: Session, services: Services, request: ExportRequest) -> PlannedExport:
    store = services.store
    base_ref = parse_reference(request.base)
    base = load_base(session, store, base_ref.repository, base_ref.identifier)
    adapters: list[tuple[AdapterArtifact, float]] = []
    for item in request.adapters:
        ref = parse_reference(item.reference)
        adapters.append((load_adapter(session, store, ref.repository, ref.identifier), item.weight))
    check_sources(base, adapters, request.base_quantization)
    if request.format == "gguf":
        try:
            check_gguf_architecture(base.config.architecture)
        except GgufUnsupported as exc:
            raise JobInvalid(str(exc)) from None
    inputs = {
        "base": {"repository": base.repository, "digest": base.digest},
        "adapters": [
            {"repository": a.repository, "digest": a.digest, "weight": w} for a, w in adapters
        ],
    }
    if request.calibration is not None:  # absent otherwise: earlier jobs keep their keys
        ref = parse_reference(request.calibration)
        calibration = load_calibration(session, store, ref.repository, ref.identifier)
        inputs["calibration"] = {"repository": calibration.repository, "digest": calibration.digest}
    return PlannedExport(
        inputs=inputs, params=request.params(), repository=adapters[0][0].repository
    )


def _encoder(params: dict[str, Any], base_dir: Path, device: str) -> TensorEncoder:
    if params.get("quantize") == "int4":
        from peftreg.merge.stream import read_model_config
        from peftreg.quantize import Int4Encoder

        return Int4Encoder.for_model_config(
            read_model_config(base_dir),
            group_size=int(params["group_size"]),
            algorithm=params["algorithm"],
            device=device,
        )
    from peftreg.checkpoint.encoding import CastEncoder

    return CastEncoder()


def _throttled(
    progress: Callable[[float, str], None], pause: float
) -> Callable[[float, str], None]:
    if pause <= 0:
        return progress

    def report(fraction: float, message: str) -> None:
        progress(fraction, message)
        time.sleep(pause)

    return report


@dataclass(frozen=True)
class Publication:
    """The export's outcome: its manifest is put in the transaction that completes the job."""

    result: dict[str, Any]
    repository: str
    package: CheckpointPackage
    principal: Principal
    services: Services

    def finalize(self, session: Session) -> None:
        manifests.put_manifest(
            session,
            principal=self.principal,
            repository=self.repository,
            reference=str(Digest.of_bytes(self.package.manifest)),
            content=self.package.manifest,
            content_type=OCI_MANIFEST,
            store=self.services.store,
        )


def run_export(context: JobContext) -> Publication:
    from peftreg.merge.inputs import AdapterInput

    services = context.services
    store = services.store
    with services.transaction() as session:
        base_in = context.inputs["base"]
        base = load_base(session, store, base_in["repository"], base_in["digest"])
        adapters = [
            (
                load_adapter(session, store, item["repository"], item["digest"]),
                float(item["weight"]),
            )
            for item in context.inputs["adapters"]
        ]
        calibration = None
        if "calibration" in context.inputs:
            source = context.inputs["calibration"]
            calibration = load_calibration(session, store, source["repository"], source["digest"])
    params = context.params
    context.log(f"base {base.repository}@{base.digest} ({base.config.parameters} parameters)")
    bases = services.settings.resolved_work_dir() / "bases"
    bases.mkdir(parents=True, exist_ok=True)
    base_dir = materialize(store, base.manifest, bases / Digest.parse(base.digest).hex)
    inputs = []
    for n, (adapter, weight) in enumerate(adapters):
        adapter_dir = materialize(store, adapter.manifest, context.work_dir / f"adapter-{n}")
        tensors = (
            "nola.safetensors" if adapter.config.kind == "nola" else "adapter_model.safetensors"
        )
        inputs.append(
            AdapterInput(
                config=adapter.config,
                tensors_path=adapter_dir / tensors,
                weight=weight,
                digest=adapter.digest,
                label=f"{adapter.repository}@{adapter.digest}",  # not the scratch directory
            )
        )
        context.log(f"adapter {adapter.repository}@{adapter.digest} weight {weight}")
    context.check()
    libraries = library_versions()
    if params.get("format") == "gguf":
        output, quantization = _write_gguf(context, base, base_dir, inputs)
    elif calibration is not None:
        output, quantization = _write_calibrated(context, base, base_dir, inputs, calibration)
        libraries |= _llmcompressor_version()
    else:
        output, quantization = _write_checkpoint(context, base, base_dir, inputs)
    config = CheckpointConfig(
        base=SourceArtifact(repository=base.repository, digest=base.digest),
        base_fingerprint=base.config.fingerprint,
        adapters=[
            SourceArtifact(repository=a.repository, digest=a.digest, weight=w) for a, w in adapters
        ],
        merge={
            "dtype": params.get("dtype") or base.config.dtype,
            "base_quantization": params.get("base_quantization", "none"),
            "adapter_kinds": [a.config.kind for a, _ in adapters],
        },
        quantization=quantization,
        libraries=libraries,
        job=context.job_id,
    )
    first = adapters[0][0]
    package = build_checkpoint_package(config, output, subject=first.descriptor)
    principal = Principal(name=f"job:{context.job_id}", grants=(Grant(first.repository, "write"),))
    _upload_blobs(services, principal, first.repository, package, context)
    digest = str(Digest.of_bytes(package.manifest))
    return Publication(
        result={
            "repository": first.repository,
            "digest": digest,
            "reference": f"{first.repository}@{digest}",
            "files": [item.title for item in package.files],
            "bytes": sum(item.size for item in package.files),
            "quantization": config.quantization.get("quantization", "none"),
        },
        repository=first.repository,
        package=package,
        principal=principal,
        services=services,
    )


def _pause(context: JobContext) -> float:
    return context.services.settings.worker_throttle_seconds


def _write_checkpoint(
    context: JobContext, base: BaseArtifact, base_dir: Path, inputs: list[Any]
) -> tuple[Path, dict[str, Any]]:
    """The merged (optionally INT4) model directory and its quantization recipe."""
    encoder = _encoder(context.params, base_dir, context.device)
    output = context.work_dir / "checkpoint"
    _merge(context, base, base_dir, inputs, output, encoder)
    return output, encoder.recipe()


def _merge(
    context: JobContext,
    base: BaseArtifact,
    base_dir: Path,
    inputs: list[Any],
    output: Path,
    encoder: TensorEncoder,
) -> None:
    import torch

    from peftreg.merge.errors import MergeCancelled
    from peftreg.merge.stream import merge_to_directory

    params = context.params
    dtype = getattr(torch, params["dtype"]) if params.get("dtype") else None
    try:
        result = merge_to_directory(
            base_dir,
            inputs,
            output,
            base_config=base.config,
            dtype=dtype,
            base_quantization=params.get("base_quantization", "none"),
            encoder=encoder,
            device=context.device,
            progress=_throttled(
                context.progress, context.services.settings.worker_throttle_seconds
            ),
            cancelled=context.cancelled,
        )
    except MergeCancelled:
        context.check()  # the interruption that made the merge stop
        raise
    context.check()
    context.log(f"merged {result.merged_modules} modules into {len(result.shards)} shards")


def _write_calibrated(
    context: JobContext,
    base: BaseArtifact,
    base_dir: Path,
    inputs: list[Any],
    calibration: CalibrationArtifact,
) -> tuple[Path, dict[str, Any]]:
    """The merged model quantized to INT4 by GPTQ or AWQ: merged dense into scratch space,
    then calibrated on the calibration artifact's text (`peftreg.quantize.calibrated`)."""
    import shutil

    from peftreg.checkpoint.encoding import CastEncoder
    from peftreg.formats.calibration import parse_calibration
    from peftreg.quantize.calibrated import CalibrationSettings, quantize_calibrated

    params = context.params
    dense = context.work_dir / "merged"
    _merge(context, base, base_dir, inputs, dense, CastEncoder())
    documents = parse_calibration(_calibration_bytes(context, calibration), calibration.title)
    context.log(
        f"calibrating {params['algorithm']} on {calibration.repository}@{calibration.digest} "
        f"({len(documents)} documents)"
    )
    output = context.work_dir / "checkpoint"
    result = quantize_calibrated(
        dense,
        output,
        documents,
        algorithm=str(params["algorithm"]),
        group_size=int(params["group_size"]),
        settings=CalibrationSettings(
            samples=int(params["calibration_samples"]),
            max_sequence_length=int(params["max_sequence_length"]),
        ),
        calibration=calibration.recipe(),
        replace=True,
    )
    shutil.rmtree(dense, ignore_errors=True)
    context.check()
    context.log(
        f"{params['algorithm']} on {result.samples} windows ({result.tokens} tokens) "
        f"in {result.seconds:.1f} s"
    )
    return output, result.recipe


def _calibration_bytes(context: JobContext, calibration: CalibrationArtifact) -> bytes:
    return b"".join(context.services.store.read(Digest.parse(calibration.file_digest)))


def _llmcompressor_version() -> dict[str, str]:
    import importlib.metadata

    return {"llmcompressor": importlib.metadata.version("llmcompressor")}


def _write_gguf(
    context: JobContext, base: BaseArtifact, base_dir: Path, inputs: list[Any]
) -> tuple[Path, dict[str, Any]]:
    """A directory holding the merged GGUF model file, and its quantization recipe."""
    from peftreg.gguf.model import export_gguf, gguf_file_name
    from peftreg.merge.errors import MergeCancelled

    params = context.params
    quantization = str(params["quantize"])
    output = context.work_dir / "checkpoint"
    output.mkdir(parents=True, exist_ok=True)
    try:
        result = export_gguf(
            base_dir,
            inputs,
            output / gguf_file_name(quantization),
            quantization=quantization,
            base_config=base.config,
            base_quantization=params.get("base_quantization", "none"),
            device=context.device,
            progress=_throttled(
                context.progress, context.services.settings.worker_throttle_seconds
            ),
            cancelled=context.cancelled,
            replace=True,
            name=f"{base.repository}@{base.digest}",
        )
    except MergeCancelled:
        context.check()
        raise
    context.check()
    context.log(f"merged {result.merged_modules} modules into a {quantization} GGUF")
    recipe = {
        "quantization": quantization,
        "format": "gguf",
        "architecture": result.recipe["architecture"],
        "tokenizer_pre": result.recipe["tokenizer_pre"],
        "tensor_types": result.tensor_types,
    }
    return output, recipe


def _already_linked(session: Session, repository: str, digest: Digest) -> bool:
    """Whether the repository already holds the blob (then touched: kept from GC)."""
    try:
        blobs.head_blob(session, repository=repository, digest=digest)
    except (BlobUnknown, NameUnknown):
        return False
    return True


def _upload_blobs(
    services: Services,
    principal: Principal,
    repository: str,
    package: CheckpointPackage,
    context: JobContext,
) -> None:
    """Put the config and every file into the store as verified, linked blobs."""
    items: list[tuple[Digest, int, Path | bytes]] = [
        (Digest.of_bytes(package.config_bytes), len(package.config_bytes), package.config_bytes)
    ]
    items += [(item.digest, item.size, item.path) for item in package.files]
    for digest, size, source in items:
        context.check()
        context.protect(digest)
        with services.transaction() as session:
            if _already_linked(session, repository, digest):
                continue
        # The digest is known: the store may write the bytes where the blob will live.
        writer = services.store.open_blob(digest)
        try:
            if isinstance(source, bytes):
                writer.write(source)
            else:
                with source.open("rb") as stream:
                    while chunk := stream.read(8 * 1024 * 1024):
                        writer.write(chunk)
            writer.close()
            with services.transaction() as session:
                blobs.publish_blob(
                    session,
                    writer=writer,
                    principal=principal,
                    repository=repository,
                    digest=digest,
                )
        finally:
            writer.cancel()  # nothing left to drop once published
        context.log(f"uploaded {digest} ({size} bytes)")
