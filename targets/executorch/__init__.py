"""ExecuTorch target (`.pte`): lift-project custom op with a C++ kernel, stock-operator fallback."""
