"""Masked token ids: validation, and the part every loss class shares.

Kept free of the op library so that ops, reference, losses and sparse can all
use it without import cycles.
"""

import operator

# The op's capacity for distinct masked ids (kMaxMaskedTokens in
# cc/math/masked_mae_row.h; also fused_masked_mae._core.MAX_MASKED_TOKENS).
MAX_MASKED_TOKENS = 256


def masked_token_list(start_token, end_token, tokens=()):
    """Validates token ids (ints >= 0, or None to skip) and returns the distinct ids
    as a list, in order of first appearance.

    Raises:
      TypeError: a token is not an integer (or None).
      ValueError: a token is negative, or there are more than MAX_MASKED_TOKENS
        distinct ids.
    """
    if isinstance(tokens, (str, bytes)) or not hasattr(tokens, "__iter__"):
        raise TypeError(f"tokens must be a list of integer class ids, got {tokens!r}")
    ids = {}
    for name, token in [("start_token", start_token), ("end_token", end_token)] + [
        ("tokens", t) for t in tokens
    ]:
        if token is None:
            continue
        try:
            if isinstance(token, bool):
                raise TypeError
            token = operator.index(token)
        except TypeError:
            raise TypeError(f"{name} must be an integer class id or None, got {token!r}") from None
        if token < 0:
            raise ValueError(f"{name} must be a class id >= 0, got {token}")
        ids[token] = None
    if len(ids) > MAX_MASKED_TOKENS:
        raise ValueError(
            f"got {len(ids)} distinct masked token ids, but the fused op supports at most "
            f"{MAX_MASKED_TOKENS} (fused_masked_mae.ops.MAX_MASKED_TOKENS)"
        )
    return list(ids)


class MaskedTokensConfig:
    """Mixin for the Keras loss classes: the masked ids (start, end and any
    `tokens`), kept as given for get_config and validated once for the op."""

    def _set_masked_tokens(self, start_token, end_token, tokens):
        self._tokens = masked_token_list(start_token, end_token, tokens)
        self.start_token = start_token
        self.end_token = end_token
        self.tokens = tuple(tokens)

    def get_config(self):
        config = super().get_config()
        config.update(
            start_token=self.start_token, end_token=self.end_token, tokens=list(self.tokens)
        )
        return config
