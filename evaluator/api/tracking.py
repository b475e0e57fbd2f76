"""See evaluator/api/__init__.py."""
__all__: list[str] = []
