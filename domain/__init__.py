"""Pure business vocabulary: money, requests, events, states and policy.

Nothing here does I/O, reads a clock or imports anything of ours, so workflow code can
use it inside Temporal's sandbox (it is passed through, not re-imported).
"""
