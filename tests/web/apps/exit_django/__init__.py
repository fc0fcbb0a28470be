"""The Django site the exit-matrix tests serve: the app in INSTALLED_APPS and its middleware,
nothing else (the setup docs/django.md shows), one entry per `/hit/<id>`."""
