package nfsd

import (
	"fmt"
	"net"
	"testing"
	"time"
)

// testKey is a call key that differs from others by its XID.
func testKey(xid uint32) callKey {
	return callKey{client: "192.0.2.1", xid: xid, proc: 2, size: 120, sum: 7}
}

// begun is begin with a cancel that never comes: it must not wait.
func begun(t *testing.T, c *replyCache, k callKey) (reply []byte, run *cacheEntry) {
	t.Helper()
	reply, run, ok := c.begin(k, until(nil))
	if !ok || (reply == nil) == (run == nil) {
		t.Fatalf("begin %+v: reply %q, run %v, ok %v: want a reply or an entry to run", k, reply, run, ok)
	}
	return reply, run
}

// until is a wait for begin that ends early, false, when cancel is
// closed: the duplicate's connection ends.
func until(cancel <-chan struct{}) func(done <-chan struct{}) bool {
	return func(done <-chan struct{}) bool {
		select {
		case <-done:
			return true
		case <-cancel:
			return false
		}
	}
}

func TestReplyCacheReplays(t *testing.T) {
	c := newReplyCache()
	k := testKey(1)
	_, e := begun(t, c, k)
	if e == nil {
		t.Fatal("a new call: not run")
	}
	c.finish(e, []byte("reply 1"))
	if reply, _ := begun(t, c, k); string(reply) != "reply 1" {
		t.Errorf("the same call again: reply %q, want %q", reply, "reply 1")
	}
	for _, tc := range []struct {
		name   string
		change func(*callKey)
	}{
		{"another XID", func(k *callKey) { k.xid++ }},
		{"another client", func(k *callKey) { k.client = "192.0.2.2" }},
		{"another procedure", func(k *callKey) { k.proc = 12 }},
		{"another length", func(k *callKey) { k.size++ }},
		{"other arguments or credential", func(k *callKey) { k.sum++ }},
	} {
		other := k
		tc.change(&other)
		if reply, run := begun(t, c, other); run == nil {
			t.Errorf("%s: answered %q from the cache, want the call run", tc.name, reply)
		}
	}
}

func TestReplyCacheWaitsForFirstAttempt(t *testing.T) {
	c := newReplyCache()
	waiting := make(chan struct{}, 1)
	c.waiting = func() { waiting <- struct{}{} }
	type result struct {
		reply []byte
		run   *cacheEntry
		ok    bool
	}
	duplicate := func(k callKey, cancel <-chan struct{}) <-chan result {
		out := make(chan result, 1)
		go func() {
			r, e, ok := c.begin(k, until(cancel))
			out <- result{r, e, ok}
		}()
		select {
		case <-waiting:
		case <-time.After(callTimeout):
			t.Fatal("the duplicate of a call in progress did not wait")
		}
		return out
	}
	get := func(what string, out <-chan result) result {
		select {
		case r := <-out:
			return r
		case <-time.After(callTimeout):
			t.Fatalf("%s: the waiting duplicate did not return", what)
			return result{}
		}
	}

	_, e := begun(t, c, testKey(1))
	out := duplicate(testKey(1), nil)
	c.finish(e, []byte("first"))
	if r := get("finished", out); string(r.reply) != "first" || !r.ok {
		t.Errorf("a duplicate of a call that then finished: reply %q, ok %v; want the first attempt's", r.reply, r.ok)
	}

	_, e = begun(t, c, testKey(2))
	out = duplicate(testKey(2), nil)
	c.abandon(e)
	r := get("abandoned", out)
	if r.run == nil || !r.ok {
		t.Fatalf("a duplicate of a call abandoned without a reply: reply %q, ok %v; want the call run", r.reply, r.ok)
	}
	c.finish(r.run, []byte("second"))
	if reply, _ := begun(t, c, testKey(2)); string(reply) != "second" {
		t.Errorf("after the abandoned call ran again: reply %q, want %q", reply, "second")
	}

	_, e = begun(t, c, testKey(3))
	cancel := make(chan struct{})
	out = duplicate(testKey(3), cancel)
	close(cancel) // its connection ends
	if r := get("cancelled", out); r.ok || r.run != nil || r.reply != nil {
		t.Errorf("a duplicate whose connection ended while it waited: reply %q, run %v, ok %v; want nothing", r.reply, r.run, r.ok)
	}
	c.finish(e, []byte("third"))
}

// TestReplyCacheBounds fills the cache: the oldest replies go, calls in
// progress stay, and replies expire.
func TestReplyCacheBounds(t *testing.T) {
	now := time.Unix(1e9, 0)
	c := newReplyCache()
	c.now = func() time.Time { return now }
	_, running := begun(t, c, testKey(0))
	const over = 10
	for xid := uint32(1); xid <= drcEntries+over; xid++ {
		_, e := begun(t, c, testKey(xid))
		c.finish(e, fmt.Appendf(nil, "reply %d", xid))
	}
	if n := len(c.entries); n != drcEntries+1 {
		t.Errorf("%d entries, want %d replies and the call in progress", n, drcEntries)
	}
	for xid := uint32(1); xid <= drcEntries+over; xid += 97 {
		reply, e := begun(t, c, testKey(xid))
		if evicted := xid <= over; evicted != (e != nil) {
			t.Errorf("XID %d after %d replies: reply %q, run %v; want it evicted: %v", xid, drcEntries+over, reply, e != nil, evicted)
		}
		if e != nil {
			c.abandon(e)
		}
	}
	closed := make(chan struct{})
	close(closed)
	if reply, e, ok := c.begin(testKey(0), until(closed)); ok {
		t.Errorf("the call in progress after %d replies: reply %q, run %v; want it still in progress", drcEntries+over, reply, e != nil)
	}
	c.finish(running, []byte("late"))

	now = now.Add(drcExpiry - time.Second)
	if reply, _ := begun(t, c, testKey(drcEntries)); reply == nil {
		t.Errorf("a reply before it expires: forgotten")
	}
	now = now.Add(time.Second)
	if reply, e := begun(t, c, testKey(drcEntries)); e == nil {
		t.Errorf("a reply %v old: still answered (%q)", drcExpiry, reply)
	} else {
		c.finish(e, []byte("new"))
	}
	if n := len(c.entries); n != 1 {
		t.Errorf("%d entries after the others expired, want 1", n)
	}

	_, e := begun(t, c, testKey(1<<20))
	c.finish(e, make([]byte, maxCachedReply+1))
	if _, e := begun(t, c, testKey(1<<20)); e == nil {
		t.Errorf("a reply over %d bytes: kept", maxCachedReply)
	}
}

// TestCallKey checks what tells calls apart: not the client's port, as a
// call sent again comes on a new connection.
func TestCallKey(t *testing.T) {
	c := newReplyCache()
	record := func(xid uint32, cred, args []byte) (callHeader, []byte) {
		rec := callRecord(xid, progNFS, nfsVersion, 12, cred, args)[4:]
		h, err := parseCallHeader(rec, len(rec))
		if err != nil {
			t.Fatal(err)
		}
		return h, rec
	}
	from := func(port int) string { return hostOf(&net.TCPAddr{IP: net.IPv4(192, 0, 2, 1), Port: port}) }
	h, rec := record(5, rootCred, []byte("args"))
	k := c.key(from(1000), h, rec, len(rec))
	same := func(what string, other callKey, want bool) {
		t.Helper()
		if (other == k) != want {
			t.Errorf("%s: the same key %v, want %v", what, other == k, want)
		}
	}
	same("from another port", c.key(from(2000), h, rec, len(rec)), true)
	same("from another address", c.key(hostOf(&net.TCPAddr{IP: net.IPv4(192, 0, 2, 2), Port: 1000}), h, rec, len(rec)), false)
	h2, rec2 := record(6, rootCred, []byte("args"))
	same("another XID", c.key(from(1000), h2, rec2, len(rec2)), false)
	h2, rec2 = record(5, authSysCred(1000, 1000), []byte("args"))
	same("another credential", c.key(from(1000), h2, rec2, len(rec2)), false)
	h2, rec2 = record(5, rootCred, []byte("ARGS"))
	same("other arguments", c.key(from(1000), h2, rec2, len(rec2)), false)
	same("a longer record with the same start", c.key(from(1000), h, rec, len(rec)+4), false)
}
