"""The auditor's side: calls read back from the store, prompts linked to them, replay, export and
verification against signed checkpoints. Nothing here writes to the chain except the client hook
(`prompts.hook_event`) and pruning (`verify.prune`).
"""
