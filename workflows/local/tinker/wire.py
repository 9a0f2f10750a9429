"""The stand-in's wire formats: the SDK's protobuf bodies and results (forward_backward in, ForwardBackwardOutput and
SampleResponse out) and the JSON tensors of a sample request, to and from the plain lists the engine takes."""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
from tinker.proto import tinker_public_pb2 as pb

from workflows.local.tinker.common import UserError


@dataclasses.dataclass
class Targets:
    """A request's target_prompt_logprobs: the token ids to score at each prompt position 1..len-1 (row i =
    position i + 1; -1 and unlisted cells ask nothing), and the layout the answer keeps: dense (rows, width) or
    the request's own sparse CSR indices."""

    cells: list[list[tuple[int, int]]]  # per row: (column, token id) of the cells that ask
    shape: tuple[int, int]
    crow: list[int] | None = None
    col: list[int] | None = None

    @property
    def first_row(self) -> int:
        return next(i for i, row in enumerate(self.cells) if row)


LOSS_INPUTS = {"cross_entropy": ("target_tokens", "weights"),
               "importance_sampling": ("target_tokens", "logprobs", "advantages")}


def parse_forward_backward(raw: bytes) -> tuple[str, int, dict | UserError]:
    """(model_id, seq_id, {loss_fn, forward_only, data} or the UserError that refuses the request: it still takes its
    seq_id, or the model's later requests would wait for it) from the SDK's protobuf body."""
    msg = pb.ForwardBackwardRequest()
    msg.ParseFromString(raw)
    try:
        return msg.model_id, msg.seq_id, _forward_backward_body(msg)
    except UserError as error:
        return msg.model_id, msg.seq_id, error


def _forward_backward_body(msg) -> dict:
    """{loss_fn, forward_only, data} of a ForwardBackwardRequest. Each datum is a dict in the
    engine's `Datum` convention (tokens = model_input + its last target, index 0 of every per-token list a
    placeholder) with "width": None for 1-D targets, K for 2-D (N, K) ones:
    - cross_entropy, 1-D: tokens, weights;
    - cross_entropy, 2-D: tokens, weights (1 where a row has any non-zero weight), candidates (the row's K
      target ids) and probs (the row's K weights), so the engine's soft-target loss -sum_j w_j log p(t_j) is
      Tinker's -sum_{i,j} w_ij log p(t_ij);
    - importance_sampling: tokens, weights (1 where the advantage is non-zero: the others add nothing),
      sampled_logprobs, advantages."""
    loss_fn = msg.loss_fn
    if loss_fn not in LOSS_INPUTS:
        raise UserError(f"loss_fn {loss_fn!r} is not supported here (only {', '.join(LOSS_INPUTS)})")
    data = []
    for i, datum in enumerate(msg.data):
        tokens: list[int] = []
        for chunk in datum.model_input:
            if not chunk.HasField("encoded_text"):
                raise UserError("only token (encoded_text) inputs are supported here")
            tokens += np.frombuffer(chunk.encoded_text.tokens, dtype=np.int32).tolist()
        inputs = {name: _tensor(t) for name, t in datum.loss_fn_inputs.items()}
        if "target_tokens" not in inputs:
            raise UserError(f"{loss_fn} needs loss_fn_inputs['target_tokens']")
        if loss_fn == "importance_sampling":
            data.append(_importance_sampling_datum(i, tokens, inputs))
        elif inputs["target_tokens"].ndim == 2:
            data.append(_soft_datum(i, tokens, inputs))
        else:
            if "weights" in inputs and inputs["weights"].ndim != 1:
                raise UserError(f"datum {i}: 1-D target_tokens need 1-D weights")
            targets = inputs["target_tokens"].astype(np.int64).tolist()
            weights = inputs["weights"].tolist() if "weights" in inputs else [1.0] * len(targets)
            if not tokens or len(targets) != len(tokens) or len(weights) != len(tokens):
                raise UserError(f"datum {i}: model_input, target_tokens and weights must have the same length")
            _check_shifted(i, tokens, targets)
            data.append({"tokens": tokens + targets[-1:], "weights": [0.0] + weights, "width": None})
    if len({d["width"] is None for d in data}) > 1:
        raise UserError("a request's datums must all have 1-D target_tokens or all 2-D (N, K) ones")
    return {"loss_fn": loss_fn, "forward_only": msg.forward_only, "data": data}


def _check_shifted(i: int, tokens: list[int], targets: list[int]) -> None:
    if targets[:-1] != tokens[1:]:
        raise UserError(f"datum {i}: target_tokens must be model_input shifted by one (next-token targets)")


def _soft_datum(i: int, tokens: list[int], inputs: dict) -> dict:

    targets, weights = inputs["target_tokens"].astype(np.int64), inputs.get("weights")
    if weights is None or weights.shape != targets.shape:
        raise UserError(f"datum {i}: 2-D target_tokens {list(targets.shape)} need weights of the same shape")
    if not tokens or targets.shape[0] != len(tokens) or targets.shape[1] < 1:
        raise UserError(f"datum {i}: 2-D target_tokens must have one row per model_input token and K >= 1 columns")
    asks = (weights != 0).any(axis=1).tolist()
    return {"tokens": tokens + [int(targets[-1, 0])], "weights": [0.0] + [1.0 if a else 0.0 for a in asks],
            "candidates": [[]] + targets.tolist(), "probs": [[]] + weights.astype(np.float64).tolist(),
            "width": int(targets.shape[1])}


def _importance_sampling_datum(i: int, tokens: list[int], inputs: dict) -> dict:

    unknown = sorted(set(inputs) - set(LOSS_INPUTS["importance_sampling"]))
    missing = [name for name in LOSS_INPUTS["importance_sampling"] if name not in inputs]
    if unknown or missing:
        raise UserError(f"datum {i}: importance_sampling takes loss_fn_inputs target_tokens, logprobs and advantages"
                        + (f"; missing {', '.join(missing)}" if missing else "")
                        + (f"; not {', '.join(unknown)}" if unknown else ""))
    targets = inputs["target_tokens"].astype(np.int64)
    sampled, advantages = inputs["logprobs"].astype(np.float64), inputs["advantages"].astype(np.float64)
    if not tokens or any(a.ndim != 1 or len(a) != len(tokens) for a in (targets, sampled, advantages)):
        raise UserError(f"datum {i}: model_input, target_tokens, logprobs and advantages must have the same length")
    _check_shifted(i, tokens, targets.tolist())
    return {"tokens": tokens + [int(targets[-1])], "weights": [0.0] + (advantages != 0).astype(float).tolist(),
            "sampled_logprobs": [0.0] + sampled.tolist(), "advantages": [0.0] + advantages.tolist(), "width": None}


def _tensor(msg):
    """A loss_fn_inputs tensor as a numpy array of its shape (1-D when none is given); a sparse CSR one is
    densified with 0 in the cells it leaves out (the pad the SDK uses when it makes one from a 2-D tensor)."""
    dtype = {pb.DTYPE_FLOAT32: np.float32, pb.DTYPE_INT64: np.int64, pb.DTYPE_INT32: np.int32}.get(msg.dtype)
    if dtype is None:
        raise UserError(f"unsupported tensor dtype {msg.dtype}")
    shape = [int(n) for n in msg.shape]
    if msg.HasField("sparse_csr"):
        values = np.frombuffer(msg.sparse_csr.values, dtype=dtype)
        crow = np.frombuffer(msg.sparse_csr.crow_indices, dtype=np.int64)
        col = np.frombuffer(msg.sparse_csr.col_indices, dtype=np.int64)
        if len(shape) != 2 or len(crow) != shape[0] + 1 or len(col) != len(values) or crow[0] != 0 \
                or crow[-1] != len(col) or (np.diff(crow) < 0).any() or ((col < 0) | (col >= shape[1])).any():
            raise UserError(f"a sparse CSR tensor of shape {shape} with malformed indices")
        dense = np.zeros(shape, dtype=dtype)
        dense[np.repeat(np.arange(shape[0]), np.diff(crow)), col] = values
        return dense
    array = np.frombuffer(msg.dense, dtype=dtype)
    if shape and int(np.prod(shape)) != array.size:
        raise UserError(f"a tensor of shape {shape} with {array.size} values")
    return array.reshape(shape) if shape else array


def forward_backward_output(logprobs: list, metrics: dict[str, float]) -> bytes:
    """Per datum its "logprobs": a list of floats (1-D targets) or of rows of K floats (2-D (N, K) targets). Runs
    of datums with the same trailing shape go out as one ArrayRecord each, as the SDK reads ragged outputs."""
    out = pb.ForwardBackwardOutput()
    out.loss_fn_output_type = "ArrayRecord"
    arrays = [np.asarray(row, dtype=np.float32) for row in logprobs]
    runs: list[list[np.ndarray]] = []
    for array in arrays:
        if runs and runs[-1][0].shape[1:] == array.shape[1:]:
            runs[-1].append(array)
        else:
            runs.append([array])
    for run in runs or [[]]:
        record = out.loss_fn_outputs.add()
        record.num_datums = len(run)
        field = record.fields["logprobs"]
        field.data = b"".join(a.tobytes() for a in run)
        field.offsets = np.cumsum([0] + [a.nbytes for a in run], dtype=np.int64).tobytes()
        field.dtype = pb.DTYPE_FLOAT32
        if run and run[0].ndim == 2:
            field.trailing_shape.extend(run[0].shape[1:])
    for name, value in metrics.items():
        out.metrics[name] = float(value)
    return out.SerializeToString()


def parse_targets(raw: dict, length: int) -> Targets:
    """A sample request's target_prompt_logprobs (the JSON TensorData: int64, shape [len(prompt) - 1, K], dense
    or sparse CSR) as `Targets`; -1 and the cells a sparse tensor leaves out ask nothing."""
    if not isinstance(raw, dict) or raw.get("dtype") != "int64":
        raise UserError("target_prompt_logprobs must be an int64 tensor of token ids")
    shape = raw.get("shape")
    if not isinstance(shape, list) or len(shape) != 2 or shape[0] != length - 1 or int(shape[1]) < 1:
        raise UserError(f"target_prompt_logprobs must have shape [len(prompt) - 1, K] = [{length - 1}, K], "
                        f"not {shape}")
    rows, width = int(shape[0]), int(shape[1])
    data = [int(x) for x in raw.get("data") or []]
    raw_crow, raw_col = raw.get("sparse_crow_indices"), raw.get("sparse_col_indices")
    if (raw_crow is None) != (raw_col is None):
        raise UserError("target_prompt_logprobs: sparse_crow_indices and sparse_col_indices come together")
    crow: list[int] | None = None
    col: list[int] | None = None
    if raw_crow is None or raw_col is None:
        if len(data) != rows * width:
            raise UserError(f"target_prompt_logprobs: {len(data)} values for shape {shape}")
        cells = [[(j, data[i * width + j]) for j in range(width) if data[i * width + j] != -1] for i in range(rows)]
    else:
        crow, col = [int(x) for x in raw_crow], [int(x) for x in raw_col]
        if len(crow) != rows + 1 or crow[0] != 0 or crow[-1] != len(col) or len(col) != len(data) \
                or any(b < a for a, b in itertools.pairwise(crow)) or any(not 0 <= c < width for c in col):
            raise UserError("target_prompt_logprobs: malformed sparse CSR indices")
        cells = [[(col[k], data[k]) for k in range(crow[i], crow[i + 1]) if data[k] != -1] for i in range(rows)]
    if any(token < 0 for row in cells for _, token in row):
        raise UserError("target_prompt_logprobs: a token id is negative (-1 asks nothing; others are not ids)")
    if not any(cells):
        raise UserError("target_prompt_logprobs names no token id")
    return Targets(cells, (rows, width), crow, col)


def targets_tensor(targets: Targets, found: list[dict[int, float]]):
    """The answer to `targets` (found[i]: column -> log-probability in row i) in the request's layout: float32,
    0.0 where nothing was asked."""
    msg = pb.Tensor()
    msg.dtype = pb.DTYPE_FLOAT32
    msg.shape.extend(targets.shape)
    if targets.crow is not None and targets.col is not None:
        values = [found[i].get(targets.col[k], 0.0) for i in range(targets.shape[0])
                  for k in range(targets.crow[i], targets.crow[i + 1])]
        msg.sparse_csr.values = np.asarray(values, dtype=np.float32).tobytes()
        msg.sparse_csr.crow_indices = np.asarray(targets.crow, dtype=np.int64).tobytes()
        msg.sparse_csr.col_indices = np.asarray(targets.col, dtype=np.int64).tobytes()
    else:
        dense = np.zeros(targets.shape, dtype=np.float32)
        for i, row in enumerate(found):
            for j, value in row.items():
                dense[i, j] = value
        msg.dense = dense.tobytes()
    return msg


TOPK_MASK = (0, -99999.0)  # the SDK's sentinel for a position with no top-k (tinker.types.topk_logprobs)


def sample_response(sequences: list[tuple[list[int], list[float], str]], prompt_logprobs: list[float | None] | None,
                    topk: tuple[int, int, list[list[int]], list[list[float]]] | None = None,
                    targets=None) -> bytes:
    """`sequences`: (tokens, their log-probabilities, stop reason) per sample; `prompt_logprobs`: positions 1.. of
    the prompt (None: not scored; NaN on the wire); `topk`: (prompt length, k, ids, log-probabilities) of the last
    len(ids) positions, the rows before them the SDK's sentinel; `targets`: a `targets_tensor`."""
    out = pb.SampleResponse()
    for tokens, token_logprobs, stop_reason in sequences:
        seq = out.sequences.add()
        seq.tokens = np.asarray(tokens, dtype=np.int32).tobytes()
        seq.logprobs = np.asarray(token_logprobs, dtype=np.float32).tobytes()
        seq.stop_reason = pb.STOP_REASON_STOP if stop_reason == "stop" else pb.STOP_REASON_LENGTH
    if prompt_logprobs is not None:  # NaN reads back as None: the first token has no context
        out.prompt_logprobs = np.asarray([float("nan")] + [float("nan") if x is None else x for x in prompt_logprobs],
                                         dtype=np.float32).tobytes()
    if topk is not None:
        length, k, ids, logprobs = topk
        token_ids = np.full((length, k), TOPK_MASK[0], dtype=np.int32)
        values = np.full((length, k), TOPK_MASK[1], dtype=np.float32)
        if ids:
            token_ids[length - len(ids):] = ids
            values[length - len(ids):] = logprobs
        out.topk_prompt_logprobs.token_ids = token_ids.tobytes()
        out.topk_prompt_logprobs.logprobs = values.tobytes()
        out.topk_prompt_logprobs.k = k
        out.topk_prompt_logprobs.length = length
    if targets is not None:
        out.target_prompt_logprobs.CopyFrom(targets)
    return out.SerializeToString()


