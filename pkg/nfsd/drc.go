package nfsd

import (
	"container/list"
	"hash/maphash"
	"net"
	"sync"
	"time"
)

// The duplicate request cache, as knfsd's (fs/nfsd/nfscache.c). A client
// whose call gets no reply in time — the server stalled, its connection
// broke — sends the same call (same XID, credential and arguments) again,
// on a new connection, while the first attempt may still be running. A
// call that is not idempotent must not run twice: a SETATTR of the size
// whose first attempt runs after the client wrote and committed through
// the second empties the file; a REMOVE, RENAME or MKDIR run again fails
// (NOENT, EXIST) though it succeeded. So the server remembers these calls:
// a duplicate of one still running waits for it and gets its reply, a
// duplicate of one that ended gets the reply it had.

// Bounds of the cache. A client resends after its timeout (the lab's
// client after 2 s, Linux after 60 s by default), so a reply need not
// outlive knfsd's two minutes. The number of entries bounds the memory:
// about 550 bytes each with a WRITE's reply, under 5 MiB in all (a reply
// to these calls is under 300 bytes; maxCachedReply caps one). Every
// WRITE takes one, so under 2500 WRITEs a second (160 MB/s in 64 KiB)
// the oldest reply is 3 s old: a duplicate that comes later runs again,
// as without the cache. Calls in progress are never evicted.
const (
	drcEntries     = 8192
	drcExpiry      = 2 * time.Minute
	maxCachedReply = 1024
)

// cachedProc says whether the cache takes NFSv3 procedure proc: those
// that are not idempotent (RFC 1813; knfsd's list). COMMIT is
// idempotent, and an UNSTABLE WRITE's COMMIT is only after its reply.
func cachedProc(proc uint32) bool {
	switch proc {
	case procSetattr, procWrite, procCreate, procMkdir, procSymlink, procMknod, procRemove, procRmdir, procRename, procLink:
		return true
	}
	return false
}

// callKey names a call across connections: the client's address without
// its port (a call sent again comes from a new connection), the XID, the
// procedure and a hash of the rest of the record — credential, verifier
// and arguments — with its length. XIDs are per client and reused after
// 2^32 calls; the hash tells a new call that reuses one from the old.
type callKey struct {
	client    string
	xid, proc uint32
	size      int
	sum       uint64
}

// cacheEntry is one call: in progress until its first attempt ends, then
// its reply until evicted.
type cacheEntry struct {
	key   callKey
	reply []byte        // the reply record, record mark included; set before done closes
	done  chan struct{} // closed when the first attempt ends, with a reply or abandoned
	at    time.Time     // when the reply came
	elem  *list.Element // in replyCache.replied
}

// replyCache is the duplicate request cache of a Handler, shared by all
// its connections. Entries in progress are never evicted: there is one
// per call in go-nfs or the proxy, a few per connection.
type replyCache struct {
	seed maphash.Seed
	now  func() time.Time
	// waiting, if not nil, is called when a call waits for its first
	// attempt: a test seam, so that a test releases that attempt only
	// once the duplicate waits for it.
	waiting func()

	mu      sync.Mutex
	entries map[callKey]*cacheEntry
	replied list.List // entries with a reply, oldest first
}

func newReplyCache() *replyCache {
	return &replyCache{seed: maphash.MakeSeed(), now: time.Now, entries: map[callKey]*cacheEntry{}}
}

// key is the key of a call from client of n bytes whose first bytes
// (from the XID on: the whole record, or all but the end of a large
// WRITE) are held.
func (c *replyCache) key(client string, h callHeader, held []byte, n int) callKey {
	return callKey{client: client, xid: h.xid, proc: h.proc, size: n, sum: maphash.Bytes(c.seed, held[4:])}
}

// begin looks k up. A call seen for the first time is now in progress:
// begin returns its entry, and the caller runs the call and then ends the
// entry with finish or abandon. A call whose first attempt ended gets that
// attempt's reply. A call whose first attempt still runs waits for it to
// end: wait(done) returns true once done is closed, false if the
// duplicate's connection ended first (begin returns ok false). If that
// attempt ended without a reply, this one runs instead.
func (c *replyCache) begin(k callKey, wait func(done <-chan struct{}) bool) (reply []byte, run *cacheEntry, ok bool) {
	for {
		c.mu.Lock()
		e := c.entries[k]
		if e != nil && e.reply != nil && c.now().Sub(e.at) >= drcExpiry {
			c.evict(e)
			e = nil
		}
		if e == nil {
			e = &cacheEntry{key: k, done: make(chan struct{})}
			c.entries[k] = e
			c.mu.Unlock()
			return nil, e, true
		}
		if e.reply != nil {
			c.mu.Unlock()
			return e.reply, nil, true
		}
		c.mu.Unlock()
		if c.waiting != nil {
			c.waiting()
		}
		if !wait(e.done) {
			return nil, nil, false
		}
		if e.reply != nil {
			return e.reply, nil, true
		}
	}
}

// finish ends e's first attempt with its reply, which the cache keeps
// (the caller must not change it); then it evicts the oldest replies
// beyond the bounds.
func (c *replyCache) finish(e *cacheEntry, reply []byte) {
	if len(reply) > maxCachedReply {
		c.abandon(e)
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	e.reply, e.at = reply, c.now()
	e.elem = c.replied.PushBack(e)
	close(e.done)
	for c.replied.Len() > 0 {
		old := c.replied.Front().Value.(*cacheEntry)
		if c.replied.Len() <= drcEntries && c.now().Sub(old.at) < drcExpiry {
			break
		}
		c.evict(old)
	}
}

// abandon ends e's first attempt without a reply (the connection ended
// first, the server is stopping): whether it ran is unknown, so the
// cache forgets the call, and a duplicate runs it.
func (c *replyCache) abandon(e *cacheEntry) {
	c.mu.Lock()
	defer c.mu.Unlock()
	delete(c.entries, e.key)
	close(e.done)
}

// evict forgets e, which has a reply.
func (c *replyCache) evict(e *cacheEntry) {
	delete(c.entries, e.key)
	c.replied.Remove(e.elem)
}

// hostOf is a client's address without the port.
func hostOf(a net.Addr) string {
	if t, ok := a.(*net.TCPAddr); ok {
		return t.IP.String()
	}
	return a.String()
}
