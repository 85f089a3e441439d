"""Wording shared by the exporters' messages, so Python and command-line users both read the knob
they have (the keyword for the API, the flag for ``jq-quant``)."""

REQUANTIZE_HINT = "requantize=True (jq-quant export --requantize)"
