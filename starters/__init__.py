"""Entry points: the relay, the CLI, the dev stack, the sandbox provider and the demo."""
