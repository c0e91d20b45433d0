"""Locust user for the throughput step: one page, no think time.

FastHttpUser is Locust's faster client (geventhttpclient); its documentation names it
the one to use when the load generator itself must go fast.
"""

from locust import FastHttpUser, constant, task


class PageUser(FastHttpUser):
    wait_time = constant(0)

    @task
    def course_page(self) -> None:
        self.client.get("/course/view.php?id=10")
