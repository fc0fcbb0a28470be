from __future__ import annotations

from django.contrib import admin
from django.urls import path

from . import views

urlpatterns = [
    path("admin/", admin.site.urls),
    path("documents/<str:doc_id>/share", views.share),
    path("async/documents/<str:doc_id>/share", views.ashare),
    path("health", views.health),
]
