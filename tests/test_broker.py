"""The broker transport (shared/broker.py): kombu's Redis transport, with one Redis client per channel."""

from __future__ import annotations

import json

from shared import broker, catalog
from shared.celery_app import make_celery, send_jobs
from shared.store import Lane, keys

from conftest import settings_for

SPEC = catalog.get("amazon/chronos-bolt-mini")  # served by no test worker: the messages stay queued


def test_a_channel_keeps_one_redis_client_until_kombu_replaces_its_pool(redis_server):
    app = make_celery(settings_for(redis_server))
    with app.connection_for_write() as connection:
        channel = connection.default_channel
        assert isinstance(channel, broker.Channel)
        kept = channel._create_client()
        assert channel._create_client() is kept  # kombu's own made a new one, 90-170 µs, per command
        assert channel._create_client(asynchronous=True) is not kept  # the BRPOP client stays apart
        channel._disconnect_pools()  # what kombu does after a connection error
        again = channel._create_client()
        assert again is not kept and again.connection_pool is channel.pool and again.ping()


def test_messages_sent_and_acked_through_the_kept_client_leave_nothing_behind(redis_server):
    client = redis_server.client()
    queue = keys.lane_queue(SPEC, Lane.ASYNC)
    client.delete(queue, "unacked", "unacked_index")
    app = make_celery(settings_for(redis_server))
    for job in ("a" * 32, "b" * 32):
        send_jobs(app, SPEC, Lane.ASYNC, [job])
    assert client.llen(queue) == 2
    with app.connection_for_write() as connection:
        channel = connection.default_channel
        for job in ("a" * 32, "b" * 32):
            message = channel.basic_get(queue, no_ack=False)
            assert json.loads(message.body)[0] == [job]
            assert client.hexists("unacked", message.delivery_tag)  # recorded as kombu records it
            message.ack()
            assert not client.hexists("unacked", message.delivery_tag)
    assert client.llen(queue) == 0 and client.zcard("unacked_index") == 0


def test_only_plain_redis_urls_get_the_kept_client_transport(redis_server):
    assert broker.transport_for("redis://127.0.0.1:6379/0") == "shared.broker:Transport"
    assert broker.transport_for("sentinel://127.0.0.1:26379") is None  # kombu's SentinelTransport, unchanged
    assert make_celery(settings_for(redis_server)).conf.broker_transport == "shared.broker:Transport"


def test_a_tls_broker_url_keeps_kombus_transport_which_turns_tls_on():
    """kombu turns TLS on for rediss:// only under the transport named 'rediss': a transport given
    by path would talk plain text to a TLS Redis, and no worker would ever receive a message."""
    from shared.settings import Settings

    url = "rediss://:pw@redis.example.com:6380/0"
    assert broker.transport_for(url) is None
    app = make_celery(Settings(_env_file=None, redis_url=url))
    connection = app.connection_for_write()  # built only: nothing is dialled
    assert connection.ssl and connection.transport_cls == "rediss"
