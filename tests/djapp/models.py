from __future__ import annotations

from django.db import models


class Document(models.Model):  # type: ignore[misc]
    title = models.TextField()

    class Meta:
        app_label = "djapp"
