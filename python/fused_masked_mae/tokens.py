"""Masked token ids: validation, and the part every loss class shares.

Kept free of the op library so that ops, reference, losses and sparse can all
use it without import cycles.
"""

import operator

# The op's capacity for distinct masked ids (kMaxMaskedTokens in
# cc/math/masked_mae_row.h; also fused_masked_mae._core.MAX_MASKED_TOKENS).
MAX_MASKED_TOKENS = 256


# Token ids travel as int64 (the op's attribute, the XLA handlers' array).
_ID_LIMIT = 2**63


def masked_token_list(start_token, end_token, tokens=()):
    """The one token rule of the Python front doors (the C++ ones, through
    MakeMaskedTokenSet in cc/cpu/masked_mae_cpu.h, apply the same rule):

    - a token is a Python or NumPy integer (anything with `__index__`), or None
      to skip it; bool is not a class id and is refused, as are floats;
    - each is in [0, 2**63) here, and in [0, C) once the number of classes C
      is known (checked by the op, the XLA paths and `core`);
    - repeated ids count once, and there are at most MAX_MASKED_TOKENS (256)
      distinct ids.

    Returns the distinct ids as a list of ints, in order of first appearance.

    Raises:
      TypeError: a token is not an integer (or None), or `tokens` is not a
        list of them.
      ValueError: a token is negative or not an int64, or there are more than
        MAX_MASKED_TOKENS distinct ids. The message names the value.
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
            if isinstance(token, bool) or type(token).__name__ == "bool_":
                raise TypeError
            token = operator.index(token)
        except TypeError:
            raise TypeError(f"{name} must be an integer class id or None, got {token!r}") from None
        if token < 0 or token >= _ID_LIMIT:
            raise ValueError(f"{name} must be a class id in [0, 2**63), got {token}")
        ids[int(token)] = None
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
