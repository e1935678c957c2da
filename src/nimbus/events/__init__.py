"""Async work: the dispatcher, retries, triggers (queues, topics) and schedules."""
