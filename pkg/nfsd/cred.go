package nfsd

import (
	"fmt"
	"net"
	"os"
	"runtime"
	"slices"
	"sync"

	"golang.org/x/sys/unix"
)

// Who a client's call acts as. An NFS call other than NULL must carry an
// AUTH_SYS credential (RFC 5531 appendix A): the uid, gid and
// supplementary gids of the user on the client. Root squash maps uid and
// gid 0 to an anonymous user. The server then makes each of the call's
// file system calls with its thread's filesystem identity set to the
// caller's (setfsuid, setfsgid, setgroups, as knfsd does), so that the
// kernel checks permissions as POSIX says, ACLs and the sticky bit
// included, and a file the call creates belongs to the caller.

// RPC authentication flavors and auth_stat values (RFC 5531).
const (
	authNone = 0
	authSys  = 1

	authBadCred = 1 // AUTH_BADCRED
	authTooWeak = 5 // AUTH_TOOWEAK
)

// AUTH_SYS bounds: machinename<255>, gids<16>.
const (
	maxMachineName = 255
	maxGroups      = 16
)

// cred is the identity a call acts as, after squashing.
type cred struct {
	uid, gid uint32
	gids     []uint32
}

// parseAuthSys decodes an AUTH_SYS body (authsys_parms).
func parseAuthSys(body []byte) (*cred, error) {
	r := xdrReader{b: body}
	r.u32() // stamp
	r.opaque(maxMachineName)
	c := &cred{uid: r.u32(), gid: r.u32()}
	n := r.u32()
	if r.err == nil && n > maxGroups {
		return nil, fmt.Errorf("AUTH_SYS credential with %d groups, at most %d allowed", n, maxGroups)
	}
	for range n {
		c.gids = append(c.gids, r.u32())
	}
	if r.err != nil {
		return nil, fmt.Errorf("AUTH_SYS credential: %w", r.err)
	}
	return c, nil
}

func (c *cred) equal(o *cred) bool {
	return c != nil && o != nil && c.uid == o.uid && c.gid == o.gid && slices.Equal(c.gids, o.gids)
}

// Squash says what a client's root is on the export.
type Squash struct {
	// Root maps uid 0 and gid 0 (primary or supplementary) to AnonUID and
	// AnonGID. Off, a client's root is root on the export.
	Root             bool
	AnonUID, AnonGID uint32
	// Insecure takes calls from any source port. Off (the default, as
	// knfsd's `secure` export option), a call other than NULL must come
	// from a privileged port (below 1024), which only root binds on a
	// client host: an AUTH_SYS credential is then the word of the
	// client's root, not of any user who can open a socket there
	// (TestUnprivilegedPortRefused).
	Insecure bool
}

// privilegedPort reports whether a connection from addr comes from a
// port only root may bind (IPPORT_RESERVED). An address that is not TCP
// (a pipe in a test) has no port to check and passes.
func privilegedPort(addr net.Addr) bool {
	t, ok := addr.(*net.TCPAddr)
	return !ok || t.Port < 1024
}

// apply returns c as squashed.
func (sq Squash) apply(c *cred) *cred {
	if !sq.Root {
		return c
	}
	out := &cred{uid: c.uid, gid: c.gid, gids: slices.Clone(c.gids)}
	if out.uid == 0 {
		out.uid = sq.AnonUID
	}
	if out.gid == 0 {
		out.gid = sq.AnonGID
	}
	for i, g := range out.gids {
		if g == 0 {
			out.gids[i] = sq.AnonGID
		}
	}
	return out
}

// callerOf returns the identity of an NFSv3 call with the credential
// flavor and body, squashed, or the auth_stat it is refused with.
func callerOf(flavor uint32, body []byte, sq Squash) (*cred, uint32, error) {
	switch flavor {
	case authSys:
		c, err := parseAuthSys(body)
		if err != nil {
			return nil, authBadCred, err
		}
		return sq.apply(c), 0, nil
	case authNone:
		return nil, authTooWeak, fmt.Errorf("AUTH_NONE: the server needs AUTH_SYS (mount with sec=sys, the default)")
	}
	return nil, authBadCred, fmt.Errorf("credential flavor %d: the server takes AUTH_SYS only", flavor)
}

// server is the process's own identity, which a thread gets back after
// acting as a caller. Only root can take on a caller's identity.
var server = sync.OnceValue(func() (s struct {
	root   bool
	gid    int
	groups []int
}) {
	s.root = os.Geteuid() == 0
	s.gid = os.Getegid()
	s.groups, _ = unix.Getgroups()
	return s
})

// as runs f with the thread's filesystem identity set to c's. A nil c,
// or a server that is not root (Serve warns), runs f as the server.
func (c *cred) as(f func() error) error {
	if c == nil || !server().root {
		return f()
	}
	runtime.LockOSThread()
	// Deferred: a panic in f that something recovers must not leave the
	// thread with the caller's identity.
	defer func() {
		if rerr := leave(); rerr != nil {
			// The thread would go on with the caller's identity, and
			// later calls on it (the index's writes among them) act as
			// that user.
			panic(fmt.Sprintf("nfs: cannot give a thread the server's identity back: %v", rerr))
		}
		runtime.UnlockOSThread()
	}()
	if err := c.enter(); err != nil {
		return err
	}
	return f()
}

// enter sets the thread's groups, fsgid and fsuid to c's. The raw system
// calls act on the calling thread only (unix.Setgroups is one; Go's
// syscall.Setgroups would change every thread).
func (c *cred) enter() error {
	groups := make([]int, len(c.gids))
	for i, g := range c.gids {
		groups[i] = int(g)
	}
	if err := unix.Setgroups(groups); err != nil {
		return fmt.Errorf("acting as uid %d: setgroups: %w", c.uid, err)
	}
	if err := setfs(unix.SetfsgidRetGid, int(c.gid)); err != nil {
		return fmt.Errorf("acting as uid %d: setfsgid %d: %w", c.uid, c.gid, err)
	}
	if err := setfs(unix.SetfsuidRetUid, int(c.uid)); err != nil {
		return fmt.Errorf("acting as uid %d: setfsuid: %w", c.uid, err)
	}
	return nil
}

// leave gives the thread the server's identity back.
func leave() error {
	s := server()
	if err := setfs(unix.SetfsuidRetUid, 0); err != nil {
		return fmt.Errorf("setfsuid 0: %w", err)
	}
	if err := setfs(unix.SetfsgidRetGid, s.gid); err != nil {
		return fmt.Errorf("setfsgid %d: %w", s.gid, err)
	}
	if err := unix.Setgroups(s.groups); err != nil {
		return fmt.Errorf("setgroups: %w", err)
	}
	return nil
}

// setfs calls setfsuid or setfsgid, which report no failure, and checks
// that the ID took: a call with an invalid ID (-1) returns the current
// one.
func setfs(set func(int) (int, error), id int) error {
	if _, err := set(id); err != nil {
		return err
	}
	if cur, _ := set(-1); cur != id {
		return fmt.Errorf("the thread's ID is still %d: %w", cur, unix.EPERM)
	}
	return nil
}
