"""A Tinker-compatible API server on loopback, backed by the local engine: a stand-in for the hosted Tinker
service, so that the unchanged `tinker` SDK (0.38), and Thinking Machines' tinker-cookbook on top of it, can be
driven end to end without it. Only `TINKER_BASE_URL` and a placeholder key (`tml-...`) differ from production.

    python -m workflows.local.tinker --data-dir DIR [--host 127.0.0.1] [--port 0] [--model [NAME=]DIR]...
        [--latency S] [--fault-rate R] [--fault-seed N] [--dtype auto|float32|bfloat16] [--max-batch 64]

prints `tinker-server listening on http://127.0.0.1:PORT` and logs structured lines to stderr, one per request
(every refused or unknown one too); SIGTERM or SIGINT stops it within a forward pass. `TinkerServer` (process.py)
runs it as a subprocess for tests and the runner. Modules: wire (protobuf and JSON tensors), checkpoints (disk,
TTL, age encryption, the REST views), engines (base models, engine cache, the stop hook), records and state (futures,
models, the worker), training and sampling (the engine work), routes (HTTP), server (the process).

What it implements (the /api/v1 routes the SDK's service, training, sampling and REST clients use) and the
semantics it chose, since the hosted service's are not observable offline:
- models: `create_model` makes one `LocalEngine.for_training(ModelConfig(base), TrainConfig(lora_rank=rank,
  lora_alpha=32, seed=lora seed))` on the CPU (dtype: the project's `model.dtype=auto` rule, or `--dtype`). Base
  models are the project's (`model_files`: SmolLM2, or what is in the model cache) and the local HF folders given
  with `--model`; any other name gets a 400 (nothing is downloaded). A model id is `<session>:train:<n>`, as the
  SDK itself assumes for create-from-state;
- training: Tinker's losses are weighted *sums* (not means), mapped onto `LocalEngine.forward_backward(...,
  reduction="sum", loss_fn=...)`:
  - `cross_entropy` with 1-D `target_tokens` and `weights` (N,): -sum(w * logp); the targets must be
    `model_input` shifted by one (next-token training);
  - `cross_entropy` with 2-D (N, K) `target_tokens` and `weights` (top-k distillation): -sum_{i,j} w_ij *
    log p(t_ij) at position i, the engine's soft targets (`Datum(candidates=t_i, probs=w_i)`, weight 1 on the
    rows with any non-zero w); all datums of a request 1-D or all 2-D;
  - `importance_sampling` with `target_tokens` (model_input shifted by one), `logprobs` (the sampler's) and
    `advantages`, all (N,), and nothing else: -sum(exp(logp - logprobs) * advantages)
    (`Datum(sampled_logprobs=..., advantages=...)`); positions with advantage 0 add nothing and are skipped (their
    log-probabilities come from a pass without gradient).
  A loss_fn_inputs tensor may be dense or sparse CSR (cells it leaves out are 0, the pad the SDK uses when it
  sends a 2-D tensor sparse). Other losses (ppo, cispo, dro, custom, ...) are refused. Gradients accumulate over
  forward_backward requests (the SDK splits big batches into chunks) until `optim_step`, which is torch's
  AdamW with the request's lr, betas, eps, weight decay and global-norm clipping (0: none). Requests of one
  model are applied in seq_id order whatever order they arrive in; a repeated seq_id (a retry) gets the
  first one's future. Outputs: `loss_fn_outputs[i]["logprobs"]` (float32, the targets' log-probabilities: (N,),
  or (N, K) for 2-D targets where the position is weighted and 0.0 elsewhere, whose logits are never computed;
  every position for `importance_sampling` and for `forward`) and metrics `{"loss:sum": ...}`;
- checkpoints (checkpoints.py) live in `--data-dir` and survive clients and server restarts: `save_state(name)`
  writes `models/<model_id>/weights/<name>/` (adapter, optimizer and RNG state, meta.json) =
  `tinker://<model_id>/weights/<name>`; `create_training_client_from_state[_with_optimizer](path)` restores one
  into a new model; `save_weights_for_sampler(name)` writes `.../sampler_weights/<name>/` (adapter only), which
  `create_sampling_client(model_path=...)` samples with; `save_weights_external(name)` writes a PEFT adapter
  folder `.../external_weights/<name>/` whose files `RestClient.get_external_weights_urls` lists as URLs served by
  this server (GET /files/..., no key needed: the stand-in for signed URLs); with `age_encryption_recipients`
  every file is stored only age-encrypted to them, as `<file>.age`. `ttl_seconds` (1 hour to 10 years, else 400)
  makes a checkpoint expire: gone to every route from then on, its folder deleted. A save under an existing name
  fails unless `overwrite=True`. The REST routes: training_runs (list, get by id: base model, rank, user metadata,
  latest checkpoints), a run's checkpoints, all checkpoints, weights_info, DELETE of a checkpoint and PUT of its
  TTL; each answers at once;
- sampling: concurrent `asample` requests are batched: the worker takes what is pending (at most
  `--max-batch` rows, after waiting `--batch-window` seconds for company), groups them by model and identical
  sampling parameters, and calls the engine once per group. Each sample draws from its own generator seeded
  by the request's seed (sample j of a request: seed + j * 2**32; no seed: a random one), so a reply depends
  only on prompt, parameters and seed, never on the batch it shared. Stop: the end-of-turn token always (the
  returned tokens then end with it); `stop` token ids and strings (the cookbook's role_colon renderer stops at
  "\n\nUser:") too, found in what the engine sampled up to its end-of-turn token or max_tokens (the tokens end with
  the one that completes the stop; the engine's work after it is wasted).
  Each sequence carries its tokens' log-probabilities, equal to `compute_logprobs` of prompt + sequence (under the
  model's own distribution: temperature 1, no top-p). `top_k`, `topk_sample_logprobs` and `prompt_alt_tokens_k`
  are not supported (the request fails with a user error). `compute_logprobs` (prompt_logprobs) returns
  [None, logp(t1|t0), ...] from `LocalEngine.compute_logprobs`, one prompt a pass;
- scoring prompts (with the sample; max_tokens=1 makes a request a prefill), from a
  `LocalEngine.position_logprobs` pass over each prompt alone (packed with others, a prompt's log-probabilities
  would depend in the last bits on what arrived beside it), the pass `topk_logprobs` and `target_logprobs` make:
  `prompt_logprobs_last_n=n` scores only the last n positions (prompt_logprobs NaN before them: None to the
  SDK); `topk_prompt_logprobs=k` answers a TopkLogprobs of `length` = len(prompt) rows, row i for prompt position
  i as prompt_logprobs (row 0 and the rows before the last n: the SDK's sentinel, token 0 and -99999.0, read back
  as None), k = min(k, vocabulary) columns, most likely first; `target_prompt_logprobs` ([len(prompt) - 1, K]
  int64 token ids, row i for position i + 1, dense or sparse CSR; -1 and unlisted cells ask nothing) answers
  float32 log-probabilities in the same shape and layout, 0.0 where nothing was asked. An id outside the
  vocabulary fails the request (category user);
- clients that go away (state.py): a sampling request nobody waits for any more (its poller's connection closed, or
  its session stopped heartbeating) is dropped from the queue, and a batch of only such requests stops at its next
  forward pass; counted as `cancelled` in the stats;
- faults and latency: `--latency S` makes each result available no sooner than S after its request arrived
  (requests in flight overlap; training still applies in order). `--fault-rate R` answers that share of the
  mutating and polling requests (forward_backward, optim_step, save/load weights, asample, retrieve_future)
  with 429 or 500 before doing any work, so the SDK's retry is safe; counts are in
  `<data-dir>/tinker-server-stats.json` and at GET /_local/stats;
- auth: every /api/v1 request needs an `X-API-Key` starting with `tml-` (else 401). The key is never logged.
"""

from workflows.local.tinker.process import TinkerServer

__all__ = ["TinkerServer"]
