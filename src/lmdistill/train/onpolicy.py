"""On-policy distillation (GKD; seed 003's `kind: policy` stage): the student samples, the teacher scores its tokens.

For each micro-batch, with probability `lmbda` the batch's responses are replaced by completions the student samples
for the batch's prompts (KV cache, batched, sampling settings from `generation:`); otherwise, with `seq_kd`, by
completions the teacher samples; otherwise the batch is trained as it is (the dataset's responses). The rebuilt
batch is right-padded like any collated batch, its labels masking the prompt and everything after the first eos,
so `DistillationTrainer.compute_loss` scores exactly the sampled tokens with the stage's losses (reverse KL by
default) and the teacher's logits over them. A served teacher (teacher.endpoint: teacher/served_scoring.py) gives its
top-k log-probs over them instead, and samples seq_kd's completions on its server.

The swap happens in `step_batches`, the hook where the trainer remakes the micro-batches of one optimiser step before
Trainer counts their label tokens: counting after the swap keeps the loss a mean over the tokens actually trained on,
across the whole accumulated batch.

DistiLLM-style replay (`replay_size > 0`): sampled batches go into a bounded buffer (without the rows sampled for
fillers, data/rounds.py, which count nothing), and an on-policy micro-batch is
taken from the buffer instead of sampled anew with probability `replay_ratio` (sampling is the expensive part).
Each process keeps its own buffer and saves it in every checkpoint (`replay_buffer_R.safetensors` for process R,
beside Trainer's `rng_state_R.pth`); a resumed run starts from it instead of from an empty buffer.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections import deque

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from lmdistill.config import GenerationSettings, OnPolicySettings, PipelineConfig, StageSettings
from lmdistill.data.collate import DistillCollator
from lmdistill.data.rounds import FILLER, drop_fillers, without_fillers
from lmdistill.data.completion import text_prompt_length, text_prompt_words
from lmdistill.data.tokenize import IGNORE_INDEX
from lmdistill.errors import DataError, TrainingError
from lmdistill.teacher.sampling import generate_kwargs
from lmdistill.teacher.thinking import ThinkingModes, thinking_modes
from lmdistill.train.offpolicy_schedule import AdaptiveShare
from lmdistill.train.trainer import DistillationTrainer

log = logging.getLogger(__name__)


def replay_file(process_index: int) -> str:
    """The checkpoint file holding process `process_index`'s replay buffer."""
    return f"replay_buffer_{process_index}.safetensors"


def batch_prompts(batch: dict[str, torch.Tensor]) -> list[list[int]]:
    """The prompt of each row of a collated causal batch: the ids before its first counted label.

    batch: input_ids [B, T], labels [B, T] (-100 on prompt and padding, unshifted). Returns B lists of ids.
    """
    labels, ids = batch["labels"], batch["input_ids"]
    counted = labels != IGNORE_INDEX  # [B, T]
    if not counted.any(dim=1).all():
        raise DataError("a policy stage needs a response in every row to find where the prompt ends, but a row has "
                        "no counted label; check the stage's sources")
    starts = counted.int().argmax(dim=1)  # [B] index of the first counted label
    prompts = [ids[i, : int(start)].tolist() for i, start in enumerate(starts)]
    if any(not p for p in prompts):
        raise DataError("a policy stage samples completions for prompts, but a row's prompt is empty; give every row "
                        "of the stage's sources a prompt (mixture.weights chooses the sources)")
    return prompts


def completion_ids(generated: list[int], eos_token_id: int) -> list[int]:
    """The sampled ids up to and including the first eos (generate pads finished rows after it)."""
    return generated[: generated.index(eos_token_id) + 1] if eos_token_id in generated else generated


def sample_batch(model: nn.Module, prompts: list[list[int]], collator: DistillCollator, settings: GenerationSettings,
                 eos_token_id: int) -> dict[str, torch.Tensor]:
    """Sample one completion per prompt and return it as a training batch (see completion_batch), on the model's
    device.

    Prompts are left-padded for generate (so new tokens follow each prompt directly). The model's train/eval mode
    is restored afterwards.
    """
    device = next(model.parameters()).device
    ids, mask = collator.collate_prompts([{"input_ids": p, "prompt_length": len(p)} for p in prompts])
    was_training = model.training
    model.eval()  # no dropout while sampling: the samples are the policy's own
    try:
        with torch.no_grad():
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=True,
                                 pad_token_id=collator.pad_token_id, eos_token_id=eos_token_id,
                                 **generate_kwargs(settings))
    finally:
        model.train(was_training)
    return completion_batch(prompts, out[:, ids.shape[1]:].tolist(), collator, eos_token_id, device)


def completion_batch(prompts: list[list[int]], generated: list[list[int]], collator: DistillCollator,
                     eos_token_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Each prompt + its generated ids (cut after the first eos) as one right-padded training row: input_ids [B, T],
    attention_mask [B, T], labels [B, T] with -100 on the prompt and on the padding after the completion."""
    examples = []
    for prompt, row in zip(prompts, generated):
        completion = completion_ids(row, eos_token_id)
        examples.append({"input_ids": prompt + completion, "labels": [IGNORE_INDEX] * len(prompt) + completion})
    batch = collator(examples)
    return {k: v.to(device) for k, v in batch.items()}


def _uniform(*key: object) -> float:
    """A number in [0, 1) fixed by `key`: the same draws on a rerun and after a resume."""
    digest = hashlib.sha256(":".join(map(str, key)).encode()).digest()
    return int.from_bytes(digest[:8], "little") / 2 ** 64


class ReplayBuffer:
    """The last `capacity` sampled batches (kept on CPU), drawn uniformly for reuse."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.batches: deque[dict[str, torch.Tensor]] = deque(maxlen=capacity)

    def __len__(self) -> int:
        return len(self.batches)

    def add(self, batch: dict[str, torch.Tensor]) -> None:
        self.batches.append({k: v.detach().cpu() for k, v in batch.items()})

    def draw(self, u: float, device: torch.device) -> dict[str, torch.Tensor]:
        """The batch at position floor(u * len) (u in [0, 1)), on `device`."""
        chosen = self.batches[min(int(u * len(self.batches)), len(self.batches) - 1)]
        return {k: v.to(device) for k, v in chosen.items()}

    def save(self, path: str) -> None:
        """Every batch, oldest first, as tensors named 'I.KEY' (batch I's input_ids [B, T] is 'I.input_ids')."""
        tensors = {f"{i}.{key}": value.contiguous() for i, batch in enumerate(self.batches)
                   for key, value in batch.items()}
        save_file(tensors, path, metadata={"batches": str(len(self.batches))})

    def load(self, path: str) -> None:
        """Replace the contents with the batches saved at `path`; past capacity, the oldest are dropped."""
        try:
            with safe_open(path, framework="pt") as f:
                batches: list[dict[str, torch.Tensor]] = [{} for _ in range(int(f.metadata()["batches"]))]
                for name in f.keys():
                    index, key = name.split(".", 1)
                    batches[int(index)][key] = f.get_tensor(name)
        except (SafetensorError, OSError, KeyError, TypeError, ValueError, IndexError) as err:
            raise TrainingError(f"replay buffer {path} cannot be read ({err!r}); delete that file to resume with an "
                                "empty replay buffer") from None
        if len(batches) > self.capacity:
            log.warning("replay buffer %s holds %d batches, more than replay_size=%d: keeping the newest %d", path,
                        len(batches), self.capacity, self.capacity)
        self.batches.clear()
        self.batches.extend(batches)


class OnPolicyTrainer(DistillationTrainer):
    """DistillationTrainer whose micro-batches are (with probability lmbda) the student's own samples."""

    def __init__(self, *args, onpolicy: OnPolicySettings, generation: GenerationSettings,
                 modes: ThinkingModes | None = None, seed: int = 0, **kwargs):
        super().__init__(*args, **kwargs)
        if self.task_type != "causal":
            raise TrainingError("on-policy (policy) stages are implemented for causal LMs; use a distill stage with "
                                "seq2seq models")
        if self.teacher_cache is not None and not self.teacher_cache.scores_any_tokens:
            raise TrainingError("a policy stage scores the student's own samples, which a teacher cache does not "
                                "hold; set teacher_source: live")
        if self.teacher is None and self.teacher_cache is None:
            raise TrainingError("a policy stage scores the student's samples with a teacher: set teacher.name (loaded "
                                "here) or teacher.endpoint (a server)")
        self.onpolicy = onpolicy
        self.generation = generation
        self.modes = modes
        self.seed = seed
        self.replay = ReplayBuffer(onpolicy.replay_size) if onpolicy.replay_size else None
        # The student-sample share: fixed, or moved by DistiLLM's schedule at every evaluation.
        self.lmbda = onpolicy.lmbda
        if onpolicy.adaptive is not None:
            self.lmbda = onpolicy.adaptive.start
            self.add_callback(AdaptiveShare(self, onpolicy.adaptive))
        self._collator = DistillCollator(self.processing_class.pad_token_id, task_type="causal")
        self._counts = {"student": 0, "replayed": 0, "teacher": 0, "dataset": 0}
        self._sample_tokens, self._sample_seconds = 0, 0.0
        # Resume: the checkpoint whose rng state Trainer has yet to restore / that step_batches restored early.
        self._rng_pending: str | None = None
        self._rng_restored_early: str | None = None

    # ------------------------------------------------------------------ checkpoints: replay buffer; rng on resume
    def _save_rng_state(self, output_dir: str) -> None:
        # Every process passes here to write its own rng_state_R.pth: the place for its own buffer too.
        super()._save_rng_state(output_dir)
        if self.replay is not None:
            self.replay.save(os.path.join(output_dir, replay_file(self.args.process_index)))

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        # Restored here, not with the rng state: every process, every backend (DeepSpeed too) passes this hook before
        # the first step, whereas a mid-epoch resume restores the rng state only after that step's batches are built.
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None:
            return
        self._rng_pending = checkpoint
        if self.replay is None:
            return
        path = os.path.join(checkpoint, replay_file(self.args.process_index))
        if not os.path.exists(path):
            log.warning("checkpoint %s has no replay buffer for process %d (written before buffers were saved, or "
                        "by fewer processes): resuming with an empty replay buffer", checkpoint,
                        self.args.process_index)
            return
        self.replay.load(path)
        log.info("replay buffer restored from %s: %d batches", path, len(self.replay))

    def _load_rng_state(self, checkpoint: str | None) -> None:
        # Trainer restores the rng state at the start of the resumed epoch (before any batch), or, resuming mid-epoch,
        # only after the first step's batches are gathered: too late for the samples drawn while gathering them.
        # step_batches restores it before sampling then, and this later call must not rewind it.
        if checkpoint is not None and checkpoint == self._rng_restored_early:
            self._rng_restored_early = None
            return
        self._rng_pending = None
        super()._load_rng_state(checkpoint)

    # ------------------------------------------------------------------ the hook: swap micro-batches, then count
    def step_batches(self, batches: list[dict]) -> list[dict]:
        if self._rng_pending is not None:  # the first step of a mid-epoch resume: sample as the uninterrupted run did
            super()._load_rng_state(self._rng_pending)
            self._rng_restored_early, self._rng_pending = self._rng_pending, None
        # A batch sampled for the read rows' prompts has their rows: a filler's completion counts nothing either.
        batches = [drop_fillers(self.policy_batch(batch, index), batch) for index, batch in enumerate(batches)]
        if self.teacher_cache is not None and self.objective.needs_teacher:
            # A served teacher (the only top-k one a policy stage takes) scores the whole step at once: every row of
            # every micro-batch in flight together, not one micro-batch after another.
            self.teacher_cache.prefetch(batches)
        return batches

    def policy_batch(self, batch: dict[str, torch.Tensor], index: int) -> dict[str, torch.Tensor]:
        """One micro-batch as trained: student samples (fresh or replayed), teacher samples, or the batch itself."""
        step = self.state.global_step
        if _uniform(self.seed, "lmbda", step, index) < self.lmbda:
            if self.replay and _uniform(self.seed, "replay", step, index) < self.onpolicy.replay_ratio:
                self._counts["replayed"] += 1
                batch.pop(FILLER, None)  # the replayed rows are not the read ones: none of them is a filler
                return self.replay.draw(_uniform(self.seed, "draw", step, index), batch["input_ids"].device)
            sampled = self._sample(self._student_samples, batch, step, index)
            if self.replay is not None:
                # A filler's completion stays out of the buffer: replayed, it would no longer be marked, and would
                # train. A micro-batch of fillers only still adds one, its labels masked (replayed, it trains nothing):
                # every process's buffer then fills at the same steps, so all of them replay, or sample, together (a
                # student sharded over the processes samples collectively; one process sampling alone would hang).
                kept = without_fillers(sampled, batch)
                self.replay.add(kept if kept is not None else
                                {**sampled, "labels": torch.full_like(sampled["labels"], IGNORE_INDEX)})
            self._counts["student"] += 1
            return sampled
        if self.onpolicy.seq_kd:
            self._counts["teacher"] += 1
            return self._sample(self._teacher_samples, batch, step, index)
        self._counts["dataset"] += 1
        return batch

    def _student_samples(self, prompts: list[list[int]], step: int, index: int) -> dict[str, torch.Tensor]:
        return sample_batch(self.accelerator.unwrap_model(self.model), prompts, self._collator, self.generation,
                            self.processing_class.eos_token_id)

    def _teacher_samples(self, prompts: list[list[int]], step: int, index: int) -> dict[str, torch.Tensor]:
        """seq_kd: the teacher's completions, sampled here by a loaded teacher or asked of a served one."""
        eos = self.processing_class.eos_token_id
        if self.teacher is not None:
            return sample_batch(self.teacher, prompts, self._collator, self.generation, eos)
        seed = int(_uniform(self.seed, "teacher", step, index) * 2 ** 31)  # the same request on a rerun
        generated = self.teacher_cache.completions(prompts, self.generation, seed)
        return completion_batch(prompts, generated, self._collator, eos, torch.device("cpu"))

    def _sample(self, sampler, batch: dict[str, torch.Tensor], step: int, index: int) -> dict[str, torch.Tensor]:
        """`sampler(prompts, step, index)`'s batch for the prompts of `batch` (in their thinking modes), on
        `batch`'s device."""
        prompts = batch_prompts(batch)
        if self.modes is not None:
            keys = batch["example_id"].tolist() if "example_id" in batch else [
                f"{step}:{index}:{i}" for i in range(len(prompts))]
            prompts = [self.modes.apply(p, self.modes.is_thinking(key)) for p, key in zip(prompts, keys)]
        start = time.perf_counter()
        sampled = sampler(prompts, step, index)
        self._sample_seconds += time.perf_counter() - start
        self._sample_tokens += int((sampled["labels"] != IGNORE_INDEX).sum())
        return {k: v.to(batch["input_ids"].device) for k, v in sampled.items()}

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:
            total = max(1, sum(self._counts.values()))
            for name, count in self._counts.items():
                logs[f"onpolicy/{name}_share"] = round(count / total, 4)
            logs["onpolicy/lmbda"] = self.lmbda
            if self._sample_seconds:
                logs["onpolicy/sample_tokens_per_s"] = round(self._sample_tokens / self._sample_seconds, 1)
            self._counts = dict.fromkeys(self._counts, 0)
            self._sample_tokens, self._sample_seconds = 0, 0.0
        super().log(logs, start_time)


def policy_options(config: PipelineConfig, tokenizer, stage: StageSettings) -> dict:
    """OnPolicyTrainer's own arguments for a `kind: policy` stage."""
    return {"onpolicy": stage.onpolicy or OnPolicySettings(), "generation": config.generation,
            "modes": thinking_modes(tokenizer, config.generation, config.training.seed), "seed": config.training.seed}


def policy_sources(sources: dict[str, list[dict]], settings: GenerationSettings,
                   stage_name: str) -> dict[str, list[dict]]:
    """The examples a policy stage prompts with. A plain-text row has no prompt: the first part of its text is one
    (generation.text_prompt_fraction / text_prompt_tokens, as `generate` and evaluation take it), masked in the
    labels, and the rest of the text is its response."""
    prompted = {}
    for name, rows in sources.items():
        prompted[name] = [_text_as_prompted(ex, settings) if "text_tokens" in ex else ex for ex in rows]
        if texts := sum("text_tokens" in ex for ex in rows):
            log.info("stage %s: %d rows of source %s are plain text; each is prompted with %s "
                     "(generation.text_prompt_fraction / text_prompt_tokens)", stage_name, texts, name,
                     text_prompt_words(settings.text_prompt_fraction, settings.text_prompt_tokens))
    return prompted


def _text_as_prompted(example: dict, settings: GenerationSettings) -> dict:
    cut = text_prompt_length(example, settings.text_prompt_fraction, settings.text_prompt_tokens)
    prompted = {key: value for key, value in example.items() if key != "text_tokens"}  # a prompt/response now
    return {**prompted, "prompt_length": cut, "labels": [IGNORE_INDEX] * cut + example["labels"][cut:]}
