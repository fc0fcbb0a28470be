from __future__ import annotations

from django.urls import path

from . import views

urlpatterns = [
    path("documents/<str:doc_id>/share", views.share),
    path("health", views.health),
]
