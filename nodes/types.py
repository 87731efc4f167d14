"""Socket types of the pack."""
from comfy_api.latest import io

#: an InversionResult (core/result.py): the trajectory of an inversion, its grid and method state
Inversion = io.Custom("INVERSE_INVERSION")

CATEGORY = "Inverse"

#: a degradation operator (core/operators.py): A, its adjoint and the measurement noise
Operator = io.Custom("INVERSE_OPERATOR")

#: prompt-to-prompt / MasaCtrl settings (core/attention_control.py AttentionControl)
AttentionControl = io.Custom("INVERSE_ATTENTION_CONTROL")
