package nfsd

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"time"

	nfs "github.com/willscott/go-nfs"
	"golang.org/x/sys/unix"
)

// The record layer in front of go-nfs. go-nfs answers every WRITE as
// FILE_SYNC and its COMMIT does nothing, it ignores credentials, and its
// table of procedures cannot be changed from outside; so each client
// connection goes through a proxy that reads the client's ONC RPC records
// (RFC 5531), refuses NFS calls without an AUTH_SYS credential, sets the
// identity go-nfs's calls act as (cred.go), answers UNSTABLE WRITEs,
// COMMITs and ACCESS itself, checks a LOOKUP's search permission, and
// passes every other record unchanged to go-nfs over a pipe. Calls that
// are not idempotent go through the duplicate request cache (drc.go).

// ONC RPC and NFSv3 numbers (RFC 5531, RFC 1813).
const (
	lastFragment = 1 << 31
	msgCall      = 0
	msgReply     = 1
	msgDenied    = 1 // reply_stat MSG_DENIED
	authError    = 1 // reject_stat AUTH_ERROR
	rpcVersion   = 2
	progNFS      = 100003
	nfsVersion   = 3
	procSetattr  = 2
	procLookup   = 3
	procAccess   = 4
	procRead     = 6
	procWrite    = 7
	procCreate   = 8
	procMkdir    = 9
	procSymlink  = 10
	procMknod    = 11
	procRemove   = 12
	procRmdir    = 13
	procRename   = 14
	procLink     = 15
	procReaddir  = 16
	procReaddirP = 17
	procFSInfo   = 19
	procCommit   = 21
	unstable     = 0 // stable_how UNSTABLE
	progMismatch = 2 // accept_stat PROG_MISMATCH
	garbageArgs  = 4 // accept_stat GARBAGE_ARGS
	maxAuthBody  = 400
	maxHandle    = 64 // NFS3_FHSIZE
)

// callHeaderMax is the longest call header: XID, message type, RPC
// version, program, version, procedure, then credential and verifier
// (flavor, length, at most maxAuthBody bytes each).
const callHeaderMax = 6*4 + 2*(8+maxAuthBody)

// callHeaderMin is the shortest: both authenticators empty. go-nfs
// refuses shorter records too.
const callHeaderMin = 6*4 + 2*8

// maxIntercepted bounds a record the proxy decodes itself and so holds in
// memory: a WRITE of 4 MiB (Linux sends at most 1 MiB) with its header.
// A larger WRITE is refused (GARBAGE_ARGS, checkPassed): go-nfs's decoder
// allocates the data's claimed length before it reads a byte of it, and
// a client claiming gigabytes in a header, per connection, without even a
// valid handle, made the server allocate them
// (TestHugeWriteRecordNotAllocatedUpFront).
const maxIntercepted = maxWrite + 4096

// callHeader is what the proxy reads of a call before deciding who
// answers it.
type callHeader struct {
	xid, prog, vers, proc uint32
	flavor                uint32 // the credential's
	cred                  []byte // its body, in the peeked bytes: valid until the record is read
	argsAt                int    // offset of the arguments in the record
}

// parseCallHeader decodes the header at the start of a record of n
// bytes; b holds its first bytes (at most callHeaderMax).
func parseCallHeader(b []byte, n int) (callHeader, error) {
	if n < callHeaderMin {
		return callHeader{}, fmt.Errorf("a record of %d bytes, shorter than any call (%d)", n, callHeaderMin)
	}
	r := xdrReader{b: b}
	h := callHeader{xid: r.u32()}
	if mt := r.u32(); mt != msgCall {
		return h, fmt.Errorf("message type %d where a call (0) was expected", mt)
	}
	r.u32() // the RPC version: go-nfs answers a wrong one
	h.prog, h.vers, h.proc = r.u32(), r.u32(), r.u32()
	h.flavor = r.u32()
	h.cred = r.opaque(maxAuthBody)
	r.u32() // the verifier: none is checked
	r.opaque(maxAuthBody)
	if r.err != nil {
		return h, fmt.Errorf("call %d: authenticator: %w", h.xid, r.err)
	}
	h.argsAt = len(b) - len(r.b)
	return h, nil
}

// nfs3 says whether the call is to NFSv3.
func (h callHeader) nfs3() bool { return h.prog == progNFS && h.vers == nfsVersion }

// otherVersion says whether the call is to a version of NFS or MOUNT
// other than 3. go-nfs does not look at the version: it would serve an
// NFSv4 SETATTR or a MOUNT v1 MNT as version 3, past every check here.
func (h callHeader) otherVersion() bool {
	return h.prog == progNFS && h.vers != nfsVersion || h.prog == progMount && h.vers != mountVersion
}

// intercepted says whether the proxy reads a call of n bytes whole
// before deciding: it answers an UNSTABLE WRITE (which it sees in the
// arguments), a COMMIT and an ACCESS itself, and passes a LOOKUP only if
// the caller may search the directory. A larger WRITE, LOOKUP or ACCESS
// gets GARBAGE_ARGS, as any call that large (checkPassed).
func (h callHeader) intercepted(n int) bool {
	if !h.nfs3() {
		return false
	}
	switch h.proc {
	case procWrite:
		return n <= maxIntercepted
	case procCommit:
		return true
	case procLookup, procAccess, procFSInfo:
		return n <= maxPassedCall
	}
	return false
}

// cached says whether the call goes through the duplicate request cache.
func (h callHeader) cached() bool { return h.nfs3() && cachedProc(h.proc) }

// writeArgs is WRITE3args.
type writeArgs struct {
	fh     []byte
	off    uint64
	stable uint32
	data   []byte
}

func parseWrite(args []byte) (writeArgs, error) {
	r := xdrReader{b: args}
	var a writeArgs
	a.fh = r.opaque(maxHandle)
	a.off = r.u64()
	count := r.u32()
	a.stable = r.u32()
	a.data = r.opaque(len(args))
	if r.err != nil {
		return a, fmt.Errorf("WRITE arguments: %w", r.err)
	}
	if int64(count) < int64(len(a.data)) {
		a.data = a.data[:count] // go-nfs too writes the lesser
	}
	return a, nil
}

// parseCommit returns COMMIT3args' handle; the range is not used: a
// COMMIT syncs the whole file.
func parseCommit(args []byte) ([]byte, error) {
	r := xdrReader{b: args}
	fh := r.opaque(maxHandle)
	r.u64()
	r.u32()
	if r.err != nil {
		return nil, fmt.Errorf("COMMIT arguments: %w", r.err)
	}
	return fh, nil
}

// proxy serves one client connection. Calls are taken in the order the
// client sent them: before answering one itself, the proxy waits until
// go-nfs has answered every record passed to it, and it passes the next
// record only once its own call is answered, so a READ sent after an
// UNSTABLE WRITE sees the bytes.
type proxy struct {
	h      *Handler
	client net.Conn
	from   string        // the client's address, without the port: for the cache
	nfsd   net.Conn      // the proxy's end of the pipe to go-nfs
	in     *bufio.Reader // the client's records: serveClient's, and a watcher's while a call waits (waitFor)

	wmu sync.Mutex // held to write a reply to the client
	out *bufio.Writer

	// caller is who the calls passed to go-nfs act as: fs reads it.
	caller     atomic.Pointer[cred]
	fs         *fsys
	warnedAuth bool // a refused credential was logged
	warnedPort bool // a call from an unprivileged port was logged
	// failed is the errno of the last change the call go-nfs runs made
	// and failed (fsys.noteFailed): zeroed as a call that changes
	// something is passed, alone (refine).
	failed atomic.Uint32
	// removing is the procedure of the REMOVE or RMDIR passed alone to
	// go-nfs, or 0: go-nfs makes both a removal (fsys.Remove), which
	// must remove a directory for an RMDIR only and anything else for a
	// REMOVE only.
	removing atomic.Uint32
	// warned counts the calls logged as failed or undecodable: one
	// client could otherwise write a log line per call it sends (a
	// review); past warnLimit they are counted, said once.
	warned atomic.Int64

	mu      sync.Mutex
	idle    *sync.Cond   // queue emptied, or done
	queue   []passedCall // records passed to go-nfs and not yet answered, in order
	done    bool         // the client's side ended: no call is read or passed any more
	dropped bool         // go-nfs's replies are neither sent nor kept in the cache
	once    sync.Once
	closed  chan struct{} // closed by hangUp
}

// passedCall is a call passed to go-nfs, which answers them in order.
type passedCall struct {
	xid   uint32
	entry *cacheEntry // the call's in the cache, or nil
	// refine: the call changes something, and was passed alone with
	// proxy.failed zeroed: its reply's NFS3ERR_IO may be refined.
	refine bool
}

func newProxy(h *Handler, client, nfsd net.Conn) *proxy {
	p := &proxy{h: h, client: client, from: hostOf(client.RemoteAddr()), nfsd: nfsd, in: bufio.NewReaderSize(client, 64<<10), out: bufio.NewWriterSize(client, 64<<10), closed: make(chan struct{})}
	p.fs = &fsys{export: h.fs.export, who: p.caller.Load, failed: &p.failed, removing: &p.removing}
	p.idle = sync.NewCond(&p.mu)
	return p
}

// hangUp ends the client's side: the connection is closed and no call is
// read or passed any more. The pipe to go-nfs stays open until go-nfs has
// answered the calls passed to it (serveReplies closes it): such a call
// may still run — the client gave up on it and sends it again on a new
// connection, where it waits for this reply in the cache.
func (p *proxy) hangUp() {
	p.once.Do(func() {
		p.client.Close()
		p.mu.Lock()
		p.done = true
		answered := len(p.queue) == 0
		p.idle.Broadcast()
		p.mu.Unlock()
		if answered {
			p.nfsd.Close()
		}
		close(p.closed)
	})
}

// close ends both sides now: the server stops, or cannot serve the calls
// (connHandler.FromHandle). What go-nfs answers after is neither sent nor
// kept: a client sends the call again, to this server or the next.
func (p *proxy) close() {
	p.mu.Lock()
	p.dropped = true
	p.mu.Unlock()
	p.hangUp()
	p.nfsd.Close()
}

// refuse logs why the connection is closed: the client sent what no
// server could answer.
func (p *proxy) refuse(err error) {
	slog.Warn("nfs: closing a client connection: not an ONC RPC call stream", "client", p.client.RemoteAddr(), "err", err)
}

// serveClient reads the client's records until the connection ends.
func (p *proxy) serveClient() {
	defer p.hangUp()
	in := p.in
	var rec []byte
	for {
		var mark [4]byte
		if _, err := io.ReadFull(in, mark[:]); err != nil {
			return
		}
		m := binary.BigEndian.Uint32(mark[:])
		n := int(m &^ lastFragment)
		if m&lastFragment == 0 {
			p.refuse(fmt.Errorf("a record in several fragments (%d bytes first), which go-nfs does not take either", n))
			return
		}
		head, err := in.Peek(min(n, callHeaderMax))
		if err != nil {
			return
		}
		h, err := parseCallHeader(head, n)
		if err != nil {
			p.refuse(err)
			return
		}
		if h.otherVersion() {
			if _, err := io.CopyN(io.Discard, in, int64(n)); err != nil {
				return
			}
			b := replyHeader(h.xid, progMismatch)
			putU32(b, nfsVersion) // the lowest and highest versions served
			putU32(b, nfsVersion)
			if !p.send(b.Bytes()) {
				return
			}
			continue
		}
		if h.proc != 0 && !p.h.squash.Insecure && !privilegedPort(p.client.RemoteAddr()) {
			// NULL is the health check's, and carries nothing.
			if !p.warnedPort {
				p.warnedPort = true
				slog.Warn("nfs: call refused (AUTH_TOOWEAK): it comes from an unprivileged port, whose AUTH_SYS credential any user of the client host can forge; "+
					"mount as root (Linux's default, resvport), or serve such clients with --insecure (k3s.nfs_insecure); later ones on this connection are not logged",
					"client", p.client.RemoteAddr())
			}
			if _, err := io.CopyN(io.Discard, in, int64(n)); err != nil {
				return
			}
			if !p.send(deniedReply(h.xid, authTooWeak)) {
				return
			}
			continue
		}
		var c *cred
		if h.nfs3() && h.proc != 0 { // NULL takes any credential
			var stat uint32
			c, stat, err = callerOf(h.flavor, h.cred, p.h.squash)
			if err != nil {
				if !p.warnedAuth {
					p.warnedAuth = true
					slog.Warn("nfs: call refused: no usable credential (AUTH_ERROR); later ones on this connection are not logged", "client", p.client.RemoteAddr(), "err", err)
				}
				if _, err := io.CopyN(io.Discard, in, int64(n)); err != nil {
					return
				}
				if !p.send(deniedReply(h.xid, stat)) {
					return
				}
				continue
			}
		}
		if !h.intercepted(n) {
			if err := checkPassed(in, h, n); err != nil {
				if errors.Is(err, errPeek) {
					return
				}
				p.warn("nfs: call with arguments out of bounds: answered GARBAGE_ARGS", "xid", h.xid, "err", err)
				if _, err := io.CopyN(io.Discard, in, int64(n)); err != nil {
					return
				}
				if !p.send(replyHeader(h.xid, garbageArgs).Bytes()) {
					return
				}
				continue
			}
			call := passedCall{xid: h.xid}
			if h.cached() {
				// All of the record but the end of a WRITE over the bound.
				held, err := in.Peek(min(n, maxPassedCall))
				if err != nil {
					return
				}
				reply, e, ok := p.h.drc.begin(p.h.drc.key(p.from, h, held, n), p.waitFor)
				if !ok {
					return
				}
				if reply != nil {
					if _, err := io.CopyN(io.Discard, in, int64(n)); err != nil || !p.write(reply) {
						return
					}
					continue
				}
				call.entry = e
				// go-nfs answers most failures of a change IO (a
				// RENAME over a non-empty directory, a full disk):
				// passed alone, its errno is known at its reply.
				if !p.waitIdle() {
					p.forget(call)
					return
				}
				p.failed.Store(0)
				p.removing.Store(0)
				if h.proc == procRemove || h.proc == procRmdir {
					p.removing.Store(h.proc)
				}
				call.refine = true
			}
			if h.nfs3() && (h.proc == procRead || h.proc == procReaddir || h.proc == procReaddirP) {
				// go-nfs builds a READ's whole reply in memory: its
				// count is cut to maxRead, what FSINFO tells (16 MiB
				// a call pinned while the client did not read the
				// reply, a review). A short read is a READ's right.
				// The arguments lie in the record's first
				// maxReadCall bytes: a longer record (padded, which
				// go-nfs ignores) is cut all the same (it was passed
				// as it was: a second review,
				// TestPaddedReadCountCut). READDIR and READDIRPLUS
				// likewise: their counts were taken as sent, up to
				// 4 GiB, and a reply of a large directory held tens
				// of MiB (TestReaddirCountsCut).
				head := min(n, maxReadCall)
				if cap(rec) < head {
					rec = make([]byte, head)
				}
				rec = rec[:head]
				if _, err := io.ReadFull(in, rec); err != nil {
					return
				}
				clampCounts(h.proc, rec, h.argsAt)
				var body io.Reader = bytes.NewReader(rec)
				if n > head {
					body = io.MultiReader(body, in)
				}
				if !p.passAs(c, call, mark[:], body, n) {
					return
				}
				continue
			}
			if !p.passAs(c, call, mark[:], in, n) {
				return
			}
			continue
		}
		if n > maxIntercepted {
			p.refuse(fmt.Errorf("a COMMIT call of %d bytes", n))
			return
		}
		if cap(rec) < n {
			rec = make([]byte, n)
		}
		rec = rec[:n]
		if _, err := io.ReadFull(in, rec); err != nil {
			return
		}
		if !p.serveCall(h, c, mark[:], rec) {
			return
		}
	}
}

// serveCall answers an intercepted call made by c, or passes it to
// go-nfs (a WRITE that is not UNSTABLE, a LOOKUP the caller may make).
// It returns false when the connection must end.
func (p *proxy) serveCall(h callHeader, c *cred, mark, rec []byte) bool {
	args := rec[h.argsAt:]
	switch h.proc {
	case procLookup:
		return p.lookup(h, c, mark, rec)
	case procAccess:
		return p.access(h, c, args)
	case procFSInfo:
		return p.fsinfo(h, args)
	case procCommit:
		fh, err := parseCommit(args)
		if err != nil {
			return p.garbage(h, err)
		}
		reply := p.writeOrCommit(h, c, writeArgs{fh: fh})
		return reply != nil && p.write(reply)
	}
	w, err := parseWrite(args)
	if err != nil {
		return p.garbage(h, err)
	}
	reply, e, ok := p.h.drc.begin(p.h.drc.key(p.from, h, rec, len(rec)), p.waitFor)
	switch {
	case !ok:
		return false
	case reply != nil:
		return p.write(reply)
	case w.stable != unstable:
		// Alone, as every call that changes something (serveClient):
		// its failure's errno must not be taken for an earlier call's
		// (a review: an RMDIR answered NOSPC, pipelined with a WRITE
		// to a full filesystem, TestRefinedStatusIsTheCallsOwn).
		if !p.waitIdle() {
			p.h.drc.abandon(e)
			return false
		}
		p.failed.Store(0)
		p.removing.Store(0)
		return p.passAs(c, passedCall{xid: h.xid, entry: e, refine: true}, mark, bytes.NewReader(rec), len(rec))
	}
	reply = p.writeOrCommit(h, c, w)
	if reply == nil {
		p.h.drc.abandon(e)
		return false
	}
	// Cached before it is sent: a write blocked on a dead client's full
	// socket must not keep the call's duplicate waiting.
	p.h.drc.finish(e, reply)
	return p.write(reply)
}

// writeOrCommit makes an UNSTABLE WRITE (w) or a COMMIT (w.fh) as c once
// go-nfs has answered the calls before, and returns the reply record; nil
// when the connection must end unanswered.
func (p *proxy) writeOrCommit(h callHeader, c *cred, w writeArgs) []byte {
	if !p.waitIdle() {
		return nil
	}
	var n int
	var attrs wcc
	var verf [8]byte
	var err error
	if h.proc == procWrite {
		verf = p.h.verf.current()
		n, attrs, err = p.h.writeUnstable(c, w.fh, w.off, w.data)
	} else {
		attrs, err = p.h.commit(w.fh)
		verf = p.h.verf.afterSync()
	}
	if endsUnanswered(err) {
		// No reply, so that the client sends the call again, to this
		// server or the next one.
		p.endUnanswered(err)
		return nil
	}
	st := statusOf(err)
	if st != nfsOK && st != nfsStale && st != nfsAcces && st != nfsPerm {
		p.warn("nfs: call failed", "proc", nfs.NFSProcedure(h.proc).String(), "status", st, "err", err)
	}
	b := replyHeader(h.xid, 0)
	putU32(b, st)
	if err := nfs.WriteWcc(b, attrs.pre, attrs.post); err != nil {
		slog.Warn("nfs: encoding a reply", "err", err)
		return nil
	}
	if st == nfsOK {
		if h.proc == procWrite {
			putU32(b, uint32(n))
			putU32(b, unstable)
		}
		b.Write(verf[:])
	}
	return sealed(b.Bytes())
}

// garbage answers a call whose arguments do not decode.
func (p *proxy) garbage(h callHeader, err error) bool {
	p.warn("nfs: call with undecodable arguments: answered GARBAGE_ARGS", "xid", h.xid, "err", err)
	return p.send(replyHeader(h.xid, garbageArgs).Bytes())
}

// warnLimit is how many calls a connection may have logged as failed.
const warnLimit = 10

// warn logs a call's failure, up to warnLimit a connection.
func (p *proxy) warn(msg string, args ...any) {
	switch n := p.warned.Add(1); {
	case n < warnLimit:
		slog.Warn(msg, append([]any{"client", p.client.RemoteAddr()}, args...)...)
	case n == warnLimit:
		slog.Warn(msg+"; later failed calls on this connection are not logged", append([]any{"client", p.client.RemoteAddr()}, args...)...)
	}
}

// lookup passes a LOOKUP to go-nfs if c may search the directory, which
// go-nfs does not check; it answers ACCES otherwise.
func (p *proxy) lookup(h callHeader, c *cred, mark, rec []byte) bool {
	if err := checkArgs(h, rec[h.argsAt:], len(rec)); err != nil {
		return p.garbage(h, err)
	}
	r := xdrReader{b: rec[h.argsAt:]}
	dir := r.opaque(maxHandle)
	if !p.waitIdle() {
		return false
	}
	granted, path, err := p.h.access(c, dir, accessLookup)
	var attrs *nfs.FileAttribute
	if err == nil && granted == 0 {
		attrs = p.h.attrs(path)
	}
	if attrs == nil || attrs.Type != nfs.FileTypeDirectory {
		// Allowed, or go-nfs's to answer: a stale handle, not a directory.
		return p.passAs(c, passedCall{xid: h.xid}, mark, bytes.NewReader(rec), len(rec))
	}
	b := replyHeader(h.xid, 0)
	putU32(b, nfsAcces)
	if err := nfs.WritePostOpAttrs(b, attrs); err != nil {
		slog.Warn("nfs: encoding a reply", "err", err)
		return false
	}
	return p.send(b.Bytes())
}

// endUnanswered logs why a call ends its connection unanswered (not when
// the server stops) and closes the connection.
func (p *proxy) endUnanswered(err error) {
	if !errors.Is(err, errClosed) {
		slog.Warn("nfs: closing a client connection unanswered: a call failed for a reason that is not its own", "client", p.client.RemoteAddr(), "err", err)
	}
	p.close()
}

// access answers ACCESS with what c may do: go-nfs grants whatever is
// asked.
func (p *proxy) access(h callHeader, c *cred, args []byte) bool {
	r := xdrReader{b: args}
	fh := r.opaque(maxHandle)
	asked := r.u32()
	if r.err != nil {
		return p.garbage(h, fmt.Errorf("ACCESS arguments: %w", r.err))
	}
	if !p.waitIdle() {
		return false
	}
	granted, path, err := p.h.access(c, fh, asked)
	if endsUnanswered(err) {
		p.endUnanswered(err)
		return false
	}
	b := replyHeader(h.xid, 0)
	st := statusOf(err)
	putU32(b, st)
	var attrs *nfs.FileAttribute
	if path != "" {
		attrs = p.h.attrs(path)
	}
	if err := nfs.WritePostOpAttrs(b, attrs); err != nil {
		slog.Warn("nfs: encoding a reply", "err", err)
		return false
	}
	if st == nfsOK {
		putU32(b, granted)
	}
	return p.send(b.Bytes())
}

// Transfer sizes told by FSINFO. go-nfs tells 1 GiB for each, but a
// WRITE of more than maxWrite is refused (maxIntercepted), and a READ is
// cut at nfs.MaxRead: a client that took the 1 GiB at its word (Linux
// sends at most 1 MiB; others may not) had its large writes fail
// (TestFSInfoToldSizesAreServed).
const (
	maxWrite  = 4 << 20
	prefWrite = 1 << 20
	prefRead  = 1 << 20
	maxRead   = 1 << 20
	// maxReadCall bounds the part of a READ call record the proxy reads
	// to cut its count (header, credential, handle, offset, count); the
	// rest of a larger one is passed as it is.
	maxReadCall = 1024
)

// fsinfo answers FSINFO as go-nfs does, with the sizes this server
// serves.
func (p *proxy) fsinfo(h callHeader, args []byte) bool {
	r := xdrReader{b: args}
	fh := r.opaque(maxHandle)
	if r.err != nil {
		return p.garbage(h, fmt.Errorf("FSINFO arguments: %w", r.err))
	}
	if !p.waitIdle() {
		return false
	}
	path, err := p.h.pathOf(fh)
	if endsUnanswered(err) {
		p.endUnanswered(err)
		return false
	}
	b := replyHeader(h.xid, 0)
	if err != nil {
		putU32(b, nfsStale)
		putU32(b, 0) // no attributes
		return p.send(b.Bytes())
	}
	putU32(b, nfsOK)
	if err := nfs.WritePostOpAttrs(b, p.h.attrs(path)); err != nil {
		slog.Warn("nfs: encoding a reply", "err", err)
		return false
	}
	const (
		propLink        = 0x1
		propSymlink     = 0x2
		propHomogeneous = 0x8
		propCanSetTime  = 0x10
	)
	for _, v := range []uint32{maxRead, prefRead, 4096, maxWrite, prefWrite, 4096, 8192} {
		putU32(b, v) // rtmax, rtpref, rtmult, wtmax, wtpref, wtmult, dtpref
	}
	b.Write(binary.BigEndian.AppendUint64(nil, 1<<62)) // maxfilesize, as go-nfs tells
	putU32(b, 0)                                       // time_delta: 1 ns
	putU32(b, 1)
	putU32(b, propLink|propSymlink|propHomogeneous|propCanSetTime)
	return p.send(b.Bytes())
}

// passAs passes a call of c, a record of n bytes from r, to go-nfs. go-nfs
// takes one connection's calls one at a time, each acting as the
// connection's current caller; a call of another caller waits until
// go-nfs has answered those before it, then changes the caller. The
// call's cache entry ends with go-nfs's reply (answered), or without one
// if the call is not passed.
func (p *proxy) passAs(c *cred, call passedCall, mark []byte, r io.Reader, n int) bool {
	if c != nil && !c.equal(p.caller.Load()) {
		if !p.waitIdle() {
			p.forget(call)
			return false
		}
		p.caller.Store(c)
	}
	p.mu.Lock()
	if p.done {
		p.mu.Unlock()
		p.forget(call)
		return false
	}
	p.queue = append(p.queue, call)
	p.mu.Unlock()
	if _, err := p.nfsd.Write(mark); err != nil {
		return false
	}
	if _, err := io.CopyN(p.nfsd, r, int64(n)); err != nil {
		// A record cut short (the client went away in its middle):
		// go-nfs would wait for its end for ever.
		p.nfsd.Close()
		return false
	}
	return true
}

// forget ends the cache entry of a call that got no reply.
func (p *proxy) forget(call passedCall) {
	if call.entry != nil {
		p.h.drc.abandon(call.entry)
	}
}

// waitFor waits, for the cache, until done is closed (true) or the
// connection ends (false). serveClient reads nothing meanwhile, so a
// watcher reads ahead to see the client close its side: a client closes
// the connection of a call it gave up on and sends the call again on a
// new one, where it waits too, and each such connection would otherwise
// stay, with its goroutines, for as long as the first attempt runs.
func (p *proxy) waitFor(done <-chan struct{}) bool {
	watched := make(chan struct{})
	go func() {
		defer close(watched)
		p.watchHangUp()
	}()
	select {
	case <-done:
	case <-p.closed:
	}
	p.client.SetReadDeadline(time.Now()) // ends the watcher's read
	<-watched
	p.client.SetReadDeadline(time.Time{})
	select {
	case <-p.closed:
		return false
	default:
		return true
	}
}

// watchHangUp reads the client's next bytes into p.in, without taking
// them, until the client ends its side (then it hangs up) or waitFor's
// deadline. It stops watching once the reader's buffer is full: the
// client, still sending, has not left.
func (p *proxy) watchHangUp() {
	for {
		_, err := p.in.Peek(p.in.Buffered() + 1)
		switch {
		case err == nil: // more came: watch on
		case errors.Is(err, os.ErrDeadlineExceeded), errors.Is(err, bufio.ErrBufferFull):
			return
		default:
			p.hangUp()
			return
		}
	}
}

// waitIdle waits until go-nfs has answered every record passed to it.
func (p *proxy) waitIdle() bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	for len(p.queue) > 0 && !p.done {
		p.idle.Wait()
	}
	return !p.done
}

// deniedReply is a reply (with a record mark to fill in) refusing call
// xid's credential with auth_stat stat.
func deniedReply(xid, stat uint32) []byte {
	b := &bytes.Buffer{}
	for _, v := range []uint32{0, xid, msgReply, msgDenied, authError, stat} {
		putU32(b, v)
	}
	return b.Bytes()
}

// replyHeader starts a reply (a record mark to fill in, then an accepted
// reply with a null verifier) with accept state stat.
func replyHeader(xid, stat uint32) *bytes.Buffer {
	b := &bytes.Buffer{}
	for _, v := range []uint32{0, xid, msgReply, 0, 0, 0, stat} {
		putU32(b, v)
	}
	return b
}

func putU32(b *bytes.Buffer, v uint32) { b.Write(binary.BigEndian.AppendUint32(nil, v)) }

// sealed fills in the record mark of a reply built on replyHeader.
func sealed(b []byte) []byte {
	binary.BigEndian.PutUint32(b, uint32(len(b)-4)|lastFragment)
	return b
}

// send writes a reply built on replyHeader.
func (p *proxy) send(b []byte) bool { return p.write(sealed(b)) }

// clampCounts cuts the byte counts of the READ, READDIR or READDIRPLUS
// call rec (its arguments at argsAt, the file handle first) to maxRead.
func clampCounts(proc uint32, rec []byte, argsAt int) {
	if argsAt+4 > len(rec) {
		return
	}
	fh := int(binary.BigEndian.Uint32(rec[argsAt:]))
	if fh > maxHandle {
		return // go-nfs answers it
	}
	at := argsAt + 4 + (fh+3)&^3
	var counts []int
	switch proc {
	case procRead: // offset, count
		counts = []int{at + 8}
	case procReaddir: // cookie, cookieverf, count
		counts = []int{at + 16}
	case procReaddirP: // cookie, cookieverf, dircount, maxcount
		counts = []int{at + 16, at + 20}
	}
	for _, at := range counts {
		if at+4 <= len(rec) && binary.BigEndian.Uint32(rec[at:]) > maxRead {
			binary.BigEndian.PutUint32(rec[at:], maxRead)
		}
	}
}

// replyWriteTimeout bounds a reply's write to the client: one that reads
// nothing would hold the reply's buffer (a READ's, up to maxRead) and the
// connection for ever.
const replyWriteTimeout = 2 * time.Minute

// write writes a reply record to the client.
func (p *proxy) write(rec []byte) bool {
	p.wmu.Lock()
	defer p.wmu.Unlock()
	p.client.SetWriteDeadline(time.Now().Add(replyWriteTimeout))
	if _, err := p.out.Write(rec); err != nil {
		return false
	}
	return p.out.Flush() == nil
}

// serveReplies copies go-nfs's replies to the client, streaming each
// fragment (a READ reply may be large), and keeps the reply of a call the
// cache holds. It reads them until go-nfs has answered every call passed
// to it, the client gone or not, unless the proxy is closed.
func (p *proxy) serveReplies() {
	defer p.endReplies()
	in := bufio.NewReaderSize(p.nfsd, 64<<10)
	for {
		var mark [4]byte
		if _, err := io.ReadFull(in, mark[:]); err != nil {
			return
		}
		m := binary.BigEndian.Uint32(mark[:])
		n, last := int(m&^lastFragment), m&lastFragment != 0
		if last && n <= maxCachedReply && p.answeringCached() {
			rec := make([]byte, 4+n)
			copy(rec, mark[:])
			if _, err := io.ReadFull(in, rec[4:]); err != nil {
				return
			}
			// Cached before it is sent (see serveCall), and taken off
			// the queue with the writer held: a call the proxy answers
			// itself waits for the queue to empty (waitIdle), then for
			// the writer, so its reply goes out after this one; and
			// it runs, and its reply is cached for a duplicate, even
			// while this write blocks on a client gone silent.
			p.refine(rec)
			if !p.keep(rec) {
				return
			}
			if testHookReplyKept != nil {
				testHookReplyKept()
			}
			p.wmu.Lock()
			p.answered()
			p.client.SetWriteDeadline(time.Now().Add(replyWriteTimeout))
			_, err := p.out.Write(rec)
			sent := err == nil && p.out.Flush() == nil
			p.wmu.Unlock()
			if !sent {
				p.hangUp()
			}
			continue
		}
		p.wmu.Lock()
		p.client.SetWriteDeadline(time.Now().Add(replyWriteTimeout))
		p.out.Write(mark[:])
		// Read the whole fragment even if the client is gone.
		_, err := io.CopyN(ignoreErrors{p.out}, in, int64(n))
		sent := p.out.Flush() == nil // the writer keeps its first error
		p.wmu.Unlock()
		if err != nil {
			return
		}
		if !sent {
			p.hangUp()
		}
		if last && !p.answered() {
			return
		}
	}
}

// refine gives rec, go-nfs's reply to the call at the head of the queue,
// the NFS status of the errno its change failed with, where go-nfs
// answered NFS3ERR_IO or NFS3ERR_ACCES: go-nfs maps every error of a
// RENAME, REMOVE or RMDIR but ENOENT and EACCES to IO, and every error of
// a CREATE, MKDIR or SYMLINK to ACCES, so that `mv` over a non-empty
// directory said "Input/output error" on the client and a file made on a
// full filesystem "Permission denied" (TestChangeErrorsKeepTheirStatus).
// A change made but not made durable (its sync failed) is answered IO,
// not ACCES, and an EPERM PERM ("Operation not permitted", as locally).
// An EACCES, or an errno no status says better, leaves the reply as it
// is.
func (p *proxy) refine(rec []byte) {
	p.mu.Lock()
	ok := len(p.queue) > 0 && p.queue[0].refine && len(rec) >= 8 && binary.BigEndian.Uint32(rec[4:]) == p.queue[0].xid
	p.mu.Unlock()
	if !ok {
		return
	}
	// Record mark, XID, REPLY, MSG_ACCEPTED, the verifier (flavor,
	// length, body), SUCCESS, then the nfsstat3.
	if len(rec) < 24 {
		return
	}
	at := 24 + int((binary.BigEndian.Uint32(rec[20:])+3)&^3)
	if len(rec) < at+8 || binary.BigEndian.Uint32(rec[8:]) != msgReply || binary.BigEndian.Uint32(rec[12:]) != 0 || binary.BigEndian.Uint32(rec[at:]) != 0 {
		return
	}
	if st := binary.BigEndian.Uint32(rec[at+4:]); st != nfsIO && st != nfsAcces {
		return
	}
	errno := unix.Errno(p.failed.Load())
	if errno == 0 {
		return
	}
	if st := ioStatus(errno); st != nfsIO || errno == unix.EIO {
		binary.BigEndian.PutUint32(rec[at+4:], st)
	}
}

// ignoreErrors is a writer that takes every byte, whatever w does with it.
type ignoreErrors struct{ w io.Writer }

func (i ignoreErrors) Write(b []byte) (int, error) {
	i.w.Write(b)
	return len(b), nil
}

// answeringCached says whether the call go-nfs answers next is in the
// cache.
func (p *proxy) answeringCached() bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	return len(p.queue) > 0 && p.queue[0].entry != nil
}

// testHookReplyKept, if set, runs between the caching of a reply of
// go-nfs and its sending (a test widens that window with it).
var testHookReplyKept func()

// keep gives the cache rec (nil: nothing to keep), go-nfs's reply to the
// call at the head of the queue, if that call is in the cache; the call
// stays queued until answered. It returns false if no call was waiting:
// the stream from go-nfs is out of step.
func (p *proxy) keep(rec []byte) bool {
	p.mu.Lock()
	if len(p.queue) == 0 {
		p.mu.Unlock()
		slog.Warn("nfs: closing a client connection: go-nfs sent a reply to no call", "client", p.client.RemoteAddr())
		return false
	}
	e, xid := p.queue[0].entry, p.queue[0].xid
	p.queue[0].entry = nil // kept or abandoned here, once
	dropped := p.dropped
	p.mu.Unlock()
	if e == nil {
		return true
	}
	if rec == nil || dropped || len(rec) < 8 || binary.BigEndian.Uint32(rec[4:]) != xid {
		p.h.drc.abandon(e)
		return true
	}
	p.h.drc.finish(e, rec)
	return true
}

// answered takes the call go-nfs answered off the queue; its cache entry,
// unless keep gave it the reply, is abandoned. It returns false if no call
// was waiting.
func (p *proxy) answered() bool {
	if !p.keep(nil) {
		return false
	}
	p.mu.Lock()
	p.queue = p.queue[1:]
	if len(p.queue) == 0 {
		p.idle.Broadcast()
		if p.done {
			p.nfsd.Close()
		}
	}
	p.mu.Unlock()
	return true
}

// endReplies closes the proxy once go-nfs's side is done, and ends the
// cache entries of the calls it left unanswered.
func (p *proxy) endReplies() {
	p.close()
	p.mu.Lock()
	left := p.queue
	p.queue = nil
	p.mu.Unlock()
	for _, call := range left {
		p.forget(call)
	}
}

// xdrReader reads XDR (RFC 4506), remembering the first short read.
type xdrReader struct {
	b   []byte
	err error
}

func (r *xdrReader) u32() uint32 {
	if r.err != nil {
		return 0
	}
	if len(r.b) < 4 {
		r.err = io.ErrUnexpectedEOF
		return 0
	}
	v := binary.BigEndian.Uint32(r.b)
	r.b = r.b[4:]
	return v
}

func (r *xdrReader) u64() uint64 { return uint64(r.u32())<<32 | uint64(r.u32()) }

// opaque reads variable-length opaque data of at most max bytes.
func (r *xdrReader) opaque(max int) []byte {
	n := r.u32()
	if r.err != nil {
		return nil
	}
	padded := (uint64(n) + 3) &^ 3
	switch {
	case uint64(n) > uint64(max):
		r.err = fmt.Errorf("%d bytes of opaque data, at most %d allowed", n, max)
		return nil
	case uint64(len(r.b)) < padded:
		r.err = io.ErrUnexpectedEOF
		return nil
	}
	v := r.b[:n:n]
	r.b = r.b[padded:]
	return v
}
