"""Where a component may answer (spear/jetstream/replies.py): inboxes, never a subject spear
stores or the server's."""

from spear.jetstream import replies


def test_answers_go_to_inboxes_not_to_what_spear_stores_or_the_servers_subjects():
    replies.protect("guarded")
    assert replies.answerable("_INBOX.abc.1") and replies.answerable("_SPEAR_INBOX.x.2")
    assert replies.answerable("_MYAPP_INBOX.x")  # a client's own inbox prefix
    assert replies.answerable("guardedness.x")  # another first token
    for stored in ("guarded.append.demo.e1.requested", "guarded.append_task.t.registered", "guarded", "$KV.B.k"):
        assert not replies.answerable(stored), stored
    assert not replies.answerable("$JS.API.STREAM.DELETE.S") and not replies.answerable("")
