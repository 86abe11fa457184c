"""Loss library (imports only torch). Work in progress: see the module list below."""

from lmdistill.losses.errors import LossConfigError, LossInputError
from lmdistill.losses.functional import (LOGIT_LOSSES, cross_entropy, forward_kl, jsd, reverse_kl, skew_kl,
                                         skew_reverse_kl, topk_kl, tvd)
from lmdistill.losses.fused import LMHead, fused_distill_loss
from lmdistill.losses.objective import DistillObjective, LossTerm, ObjectiveOutput
