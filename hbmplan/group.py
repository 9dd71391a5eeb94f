"""One RL group: a shared prompt and the G responses sampled from it.

Validation happens here, before any schedule touches the model, so that a bad group never leaves
half-accumulated gradients behind.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["Group", "validate_groups"]

_INTEGER_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def _check_ids(name: str, t: Any) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of token ids, got {type(t).__name__}")
    if t.dtype not in _INTEGER_DTYPES:
        raise TypeError(f"{name} must hold integer token ids, got dtype {t.dtype}")
    if t.dim() != 1:
        raise ValueError(f"{name} must be 1-D [length], got shape {tuple(t.shape)}")


@dataclass(eq=False)
class Group:
    """A prompt shared by G sampled responses.

    Attributes:
        prompt: LongTensor [P] of token ids, P >= 2. The last prompt token is the *boundary token*:
            its logit predicts the first response token.
        responses: list of G >= 1 LongTensors [S_i], S_i >= 1, on the prompt's device.
        data: optional per-group data handed unchanged to the loss function (advantages,
            old log-probs, ...).
    """

    prompt: torch.Tensor
    responses: Sequence[torch.Tensor]
    data: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()
        self.responses = list(self.responses)

    def validate(self) -> None:
        """Check the group's own rules (the attributes above); ``TypeError``/``ValueError``
        naming the rule and the value. Construction checks them, and every step re-checks every
        group, since a group's fields can be changed after it was built."""
        _check_ids("prompt", self.prompt)
        if self.prompt.numel() < 2:
            raise ValueError(
                f"prompt must have length >= 2 (its last token is the boundary token), "
                f"got length {self.prompt.numel()}"
            )
        if isinstance(self.responses, torch.Tensor) or not isinstance(self.responses, Sequence):
            raise TypeError(
                f"responses must be a list of 1-D token tensors, got {type(self.responses).__name__}"
            )
        if len(self.responses) == 0:
            raise ValueError("responses must be a non-empty list (G >= 1), got 0 responses")
        for i, r in enumerate(self.responses):
            _check_ids(f"response {i}", r)
            if r.numel() == 0:
                raise ValueError(f"responses must be non-empty, got response {i} of length 0")
            if r.device != self.prompt.device:
                raise ValueError(
                    f"all tokens must be on one device, got prompt on {self.prompt.device} "
                    f"and response {i} on {r.device}"
                )
        if not isinstance(self.data, Mapping):
            raise TypeError(f"data must be a mapping, got {type(self.data).__name__}")

    @property
    def group_size(self) -> int:
        """G, the number of responses."""
        return len(self.responses)

    @property
    def prompt_len(self) -> int:
        """P, the prompt length including the boundary token."""
        return self.prompt.numel()

    @property
    def response_lens(self) -> list[int]:
        """S_i for each response."""
        return [r.numel() for r in self.responses]

    def trajectory_len(self, i: int) -> int:
        """Length of the dense trajectory input ``[prompt; r_i[:-1]]``: P + S_i - 1."""
        return self.prompt_len + self.responses[i].numel() - 1


def validate_groups(
    groups: Sequence[Group],
    vocab_size: int,
    max_positions: int | None,
    device: torch.device | None = None,
) -> None:
    """Check groups against a model: each group's own rules again (:meth:`Group.validate`: a
    group may have changed since it was built), token ids in ``[0, vocab_size)``, lengths within
    positions, tokens on the model's ``device``.

    Raises ``TypeError``/``ValueError`` naming the rule and the offending value. Costs one host
    sync per group (a min/max reduction), once per step.
    """
    if isinstance(groups, Group) or not isinstance(groups, Sequence):
        raise TypeError(f"groups must be a list of hbmplan.Group, got {type(groups).__name__}")
    if len(groups) == 0:
        raise ValueError("groups must be a non-empty list, got 0 groups")
    for g, group in enumerate(groups):
        if not isinstance(group, Group):
            raise TypeError(f"groups[{g}] must be an hbmplan.Group, got {type(group).__name__}")
        try:
            group.validate()
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"{exc} in groups[{g}]") from None
        if device is not None and group.prompt.device != device:
            raise ValueError(
                f"tokens must be on the model's device {device}, got groups[{g}] on "
                f"{group.prompt.device}"
            )
        ids = torch.cat([group.prompt.reshape(-1), *[r.reshape(-1) for r in group.responses]])
        lo, hi = torch.aminmax(ids)
        lo, hi = int(lo), int(hi)
        if lo < 0 or hi >= vocab_size:
            bad = lo if lo < 0 else hi
            raise ValueError(
                f"token ids must lie in [0, vocab_size={vocab_size}), got id {bad} in groups[{g}]"
            )
        if max_positions is not None:
            longest = max(group.prompt_len + s - 1 for s in group.response_lens)
            if longest > max_positions:
                raise ValueError(
                    f"prompt + response - 1 must fit the model's max positions {max_positions}, "
                    f"got {longest} in groups[{g}]"
                )
