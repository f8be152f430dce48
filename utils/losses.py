"""Token-level losses and scores, written once. ``labels`` are unshifted ([B, L], IGNORE outside the
target, as in ``VLBatch``): the logit at position t predicts the token at t+1."""
import torch
import torch.nn.functional as F

IGNORE = -100


def shift(logits: torch.Tensor, labels: torch.Tensor):
    """-> (logits [B, L-1, V] at predicting positions, labels [B, L-1], mask [B, L-1]), on the
    logits' device (a model split over devices gives logits on its LM head's device)."""
    labels = labels[:, 1:].to(logits.device)
    return logits[:, :-1], labels, labels != IGNORE


def _reduce(per_token, mask, per_sample: bool) -> torch.Tensor:
    """Mean over all target tokens of the batch, or with ``per_sample`` each sample's own mean [B]."""
    if per_sample:
        return (per_token * mask).sum(1) / mask.sum(1).clamp(min=1)
    return (per_token * mask).sum() / mask.sum().clamp(min=1)


def masked_nll(logits, labels, per_sample: bool = False) -> torch.Tensor:
    """Mean token negative log-likelihood of the targets."""
    lg, lb, mask = shift(logits, labels)
    nll = F.cross_entropy(lg.float().transpose(1, 2), lb.clamp(min=0), reduction="none")
    return _reduce(nll, mask, per_sample)


def masked_kl(logits, ref_logits, labels, per_sample: bool = False) -> torch.Tensor:
    """KL(ref || new) of the token distributions at the target positions, mean over tokens."""
    lg, lb, mask = shift(logits, labels)
    ref = shift(ref_logits, labels)[0].to(lg.device)
    kl = F.kl_div(lg.float().log_softmax(-1), ref.float().log_softmax(-1), log_target=True,
                  reduction="none").sum(-1)
    return _reduce(kl, mask, per_sample)


def target_predictions(logits, labels) -> list[torch.Tensor]:
    """Per sample, the argmax token at each target position (teacher forced)."""
    lg, _, mask = shift(logits, labels)
    pred = lg.argmax(-1)
    return [pred[b][mask[b]] for b in range(pred.shape[0])]


def target_ids(labels) -> list[torch.Tensor]:
    lb = labels[:, 1:]
    return [lb[b][lb[b] != IGNORE] for b in range(lb.shape[0])]


def token_accuracy(logits, labels) -> torch.Tensor:
    """Per-sample teacher-forced token accuracy of the targets, [B] in [0, 1]."""
    lg, lb, mask = shift(logits, labels)
    hit = (lg.argmax(-1) == lb) & mask
    return hit.sum(1).float() / mask.sum(1).clamp(min=1).float()
