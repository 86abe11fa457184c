"""Loss library: pure functions and small modules over torch tensors (imports only torch).

Conventions: logits/labels arrive aligned (`logits[..., t, :]` scores `labels[..., t]`; the trainer shifts
once for causal models); label -100 counts nowhere, `labels=None` counts everything; computation in float32;
KD terms include T^2; `reduction="mean"` divides by counted tokens, `"sum"` leaves it to the caller (the
objective divides by `num_items`, the counted tokens of the whole accumulated batch).

Loss names a config may use, with their parameters (defaults in brackets):

Logit terms (one `DistillObjective`; every entry also takes `weight` [1.0]; the stage sets temperature T):
    forward_kl                       KL(p || q)
    reverse_kl                       KL(q || p)
    jsd              beta [0.5]      beta KL(p||m) + (1-beta) KL(q||m), m = beta p + (1-beta) q, beta in [0, 1];
                                     0 / 1 give forward / reverse KL, as TRL's GKD maps them
    skew_kl          alpha [0.1]     KL(p || alpha p + (1-alpha) q), alpha in [0, 1)       (DistiLLM)
    skew_reverse_kl  alpha [0.1]     KL(q || alpha q + (1-alpha) p), alpha in [0, 1)       (DistiLLM)
    tvd                              0.5 sum |p - q|
    cross_entropy                    student CE on hard labels (T = 1, no T^2)
  Cached teacher (top-k log-probs): `DistillObjective.cached` / `topk_kl` with cache_temperature [1.0] and
  tail ["bucket" | "drop"]; only forward_kl (and cross_entropy) are defined there.
  Memory: `chunk_size` (tokens) on every function and on the objective; `fused_distill_loss` /
  `DistillObjective.fused` take hidden states + lm_head weight so full logits never exist;
  `DistillObjective.fused_cached` does the same against a top-k teacher cache.

Across vocabularies (teacher and student tokenizers differ; rows paired by lmdistill.data.align), in cross_vocab.py:
    uld              sum |sort(p_s) - sort(p_t)|, zero-padded to the longer vocabulary        (ULD)
    cross_vocab_kl   forward KL over the ids both vocabularies share (renormalised), ULD on the rest  (GOLD)
  Against a teacher cache (the teacher's top-k over its own ids and the tail mass): `topk_uld`,
  `topk_cross_vocab_kl`, the tail spread evenly over the other ids (or dropped); equal to the above at k = V_t.

Auxiliary terms (`build_losses` -> `AuxLoss` modules; each also takes `weight` [1.0]):
    feature      kind ["mse" | "cosine"], layers ["uniform" | [[student, teacher], ...]]   hidden states
    attention    layers ["uniform" | pairs], heads ["auto" | "average" | "group"]          attentions
                 (needs attn_implementation="eager" and output_attentions=True)
    contrastive  temperature [0.1], proj_dim [teacher width]                              last hidden state

Balancing across terms: `LossBalancer(mode="none" | "loss_scale" | "gradnorm", ema, alpha, lr)`.
"""

from lmdistill.losses.attention import AttentionDistiller, attention_loss
from lmdistill.losses.balance import BALANCE_MODES, LossBalancer
from lmdistill.losses.contrastive import ContrastiveDistiller, masked_mean_pool
from lmdistill.losses.cross_vocab import cross_vocab_kl, shared_vocabulary, uld
from lmdistill.losses.errors import LossConfigError, LossInputError
from lmdistill.losses.features import FeatureDistiller
from lmdistill.losses.functional import (LOGIT_LOSSES, cross_entropy, forward_kl, jsd, reverse_kl, skew_kl,
                                         skew_reverse_kl, topk_kl, tvd)
from lmdistill.losses.fused import LMHead, fused_distill_loss
from lmdistill.losses.layers import resolve_layer_map
from lmdistill.losses.objective import DistillObjective, LossTerm, ObjectiveOutput
from lmdistill.losses.registry import AUX_LOSSES, LOSS_NAMES, AuxLoss, BuiltLosses, ModelDims, build_losses

__all__ = [
    "AUX_LOSSES", "AttentionDistiller", "AuxLoss", "BALANCE_MODES", "BuiltLosses", "ContrastiveDistiller",
    "DistillObjective", "FeatureDistiller", "LMHead", "LOGIT_LOSSES", "LOSS_NAMES", "LossBalancer",
    "LossConfigError", "LossInputError", "LossTerm", "ModelDims", "ObjectiveOutput", "attention_loss",
    "build_losses", "cross_entropy", "cross_vocab_kl", "forward_kl", "fused_distill_loss", "jsd", "masked_mean_pool",
    "resolve_layer_map", "reverse_kl", "shared_vocabulary", "skew_kl", "skew_reverse_kl", "topk_kl", "tvd", "uld",
]
