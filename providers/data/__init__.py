"""Package data: the Vapi endedReason map."""
