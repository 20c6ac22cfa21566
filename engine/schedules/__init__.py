"""Schedules: any queue-driven job started by a cron expression or an interval.

``timing`` says when, ``service`` keeps schedules (the CLI's and the console's operations),
``scheduler`` fires them, exactly once per due time.
"""
