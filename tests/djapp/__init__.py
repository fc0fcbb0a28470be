"""A tiny Django project for the in-process Django tests (settings in tests/django_env.py)."""
