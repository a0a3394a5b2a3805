from django.urls import path

from djproject import views

urlpatterns = [
    path("set/<str:key>/", views.set_value),
    path("get/<str:key>/", views.get_value),
    path("aset/<str:key>/", views.aset_value),
    path("aget/<str:key>/", views.aget_value),
    path("load/<str:key>/", views.load_once),
    path("page/", views.cached_page),
    path("worker/<str:key>/", views.worker_read),
]
