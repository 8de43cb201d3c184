"""Kafka through kafka-python 3.0.12: clients, topic provisioning, ACL diagnostics, retry.

Every workaround for the client lives here, named for the behaviour it works around;
the run loop (daemon.streaming) is the only user.
"""
