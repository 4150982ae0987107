"""Small helpers every layer may use: option coercion, host / disk storage of tensors, memory probes."""
