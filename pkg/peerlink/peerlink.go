// Package peerlink is the TCP connection between the two nodes' daemons
// (replication, manifests for resync and verify): TLS 1.3 with mutual
// authentication by certificates that both nodes derive from the cluster
// key, so that nothing but the key has to be managed. A peer without the
// key cannot complete the handshake; every byte after it is encrypted and
// integrity-protected by TLS.
//
// The key gives a CA (its Ed25519 key drawn from HKDF-SHA256 of the key,
// its certificate built from fixed fields: every node builds the same
// bytes). Each process makes a fresh leaf key and has the CA sign it. A
// node trusts the CAs of its key and of its previous key (a rotation in
// progress) and presents the leaf of the CA its peer trusts.
package peerlink

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"crypto/hkdf"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"math/big"
	"net"
	"syscall"
	"time"

	"github.com/duet-ha/duet/pkg/wire"
)

// ServerName is the name in every leaf certificate and the name a node
// checks its peer's certificate for: nodes are told apart by address, the
// certificate proves only that the peer holds the cluster key.
const ServerName = "duet-peer"

// caInfo is the HKDF info that draws a CA key from a cluster key; v1
// names this derivation, should it ever change.
const caInfo = "duet link CA v1"

// protoPrefix starts the ALPN names by which a client says which CAs it
// trusts (see Link.Dial): not negotiated, only read by the server.
const protoPrefix = "duet-link-ca-"

// Options configures a Link.
type Options struct {
	// Node is this node's name, the common name of its certificate.
	Node string
	// Keys are the cluster keys this node trusts: the current one first,
	// then the previous one during a rotation.
	Keys [][]byte
	// Plaintext turns TLS off (insecure_plaintext_link): frames travel
	// unencrypted, authenticated only by the handshake. Both nodes must
	// agree.
	Plaintext bool
}

// Link opens and accepts the connections between the nodes.
type Link struct {
	keys      [][]byte
	plaintext bool
	// One CA and one leaf per key, in the order of keys.
	cas    []*ca
	leaves []tls.Certificate
	pool   *x509.CertPool
}

// ca is the certificate authority a cluster key stands for.
type ca struct {
	id   string // hex of the first 8 bytes of SHA-256 of its public key
	key  ed25519.PrivateKey
	cert *x509.Certificate
}

// New builds a link from the cluster keys. It makes this process's leaf
// key; nothing is read from or written to disk.
func New(o Options) (*Link, error) {
	if len(o.Keys) == 0 {
		return nil, errors.New("peerlink: no cluster key")
	}
	l := &Link{keys: o.Keys, plaintext: o.Plaintext, pool: x509.NewCertPool()}
	if o.Plaintext {
		return l, nil
	}
	pub, priv, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		return nil, err
	}
	for _, k := range o.Keys {
		c, err := newCA(k)
		if err != nil {
			return nil, err
		}
		leaf, err := c.sign(o.Node, pub, priv)
		if err != nil {
			return nil, err
		}
		l.cas = append(l.cas, c)
		l.leaves = append(l.leaves, leaf)
		l.pool.AddCert(c.cert)
	}
	return l, nil
}

// Keys returns the cluster keys, the current one first, for the
// application handshake inside the link.
func (l *Link) Keys() [][]byte { return l.keys }

// Plaintext reports whether TLS is off.
func (l *Link) Plaintext() bool { return l.plaintext }

// far is the validity of the certificates: trust comes from the cluster
// key, not from dates, and a node whose clock is off (an edge box without
// a real-time clock starts in 1970) must still connect.
var (
	farPast   = time.Unix(0, 0).UTC()
	farFuture = time.Date(9999, 12, 31, 23, 59, 59, 0, time.UTC)
)

// newCA derives the CA of a cluster key. Its certificate has fixed fields
// and an Ed25519 signature, which is deterministic: every node builds the
// same bytes.
func newCA(key []byte) (*ca, error) {
	seed, err := hkdf.Key(sha256.New, key, nil, caInfo, ed25519.SeedSize)
	if err != nil {
		return nil, err
	}
	priv := ed25519.NewKeyFromSeed(seed)
	pub := priv.Public().(ed25519.PublicKey)
	sum := sha256.Sum256(pub)
	id := hex.EncodeToString(sum[:8])
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1),
		// The id in the name tells the CAs of two keys apart: a client
		// picks its certificate by the names the server accepts.
		Subject:               pkix.Name{CommonName: "duet link CA " + id},
		NotBefore:             farPast,
		NotAfter:              farFuture,
		KeyUsage:              x509.KeyUsageCertSign,
		BasicConstraintsValid: true,
		IsCA:                  true,
		MaxPathLenZero:        true,
		SubjectKeyId:          sum[:20],
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, pub, priv)
	if err != nil {
		return nil, fmt.Errorf("peerlink: building the CA certificate: %w", err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, err
	}
	return &ca{id: id, key: priv, cert: cert}, nil
}

// sign makes the leaf certificate of this process's key pub, named node.
func (c *ca) sign(node string, pub ed25519.PublicKey, priv ed25519.PrivateKey) (tls.Certificate, error) {
	var sb [16]byte
	rand.Read(sb[:])
	tmpl := &x509.Certificate{
		SerialNumber: new(big.Int).SetBytes(sb[:]),
		Subject:      pkix.Name{CommonName: node},
		DNSNames:     []string{ServerName},
		NotBefore:    farPast,
		NotAfter:     farFuture,
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, c.cert, pub, c.key)
	if err != nil {
		return tls.Certificate{}, fmt.Errorf("peerlink: signing this node's certificate: %w", err)
	}
	leaf, err := x509.ParseCertificate(der)
	if err != nil {
		return tls.Certificate{}, err
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: priv, Leaf: leaf}, nil
}

// base is the TLS configuration both ends share.
func (l *Link) base() *tls.Config {
	return &tls.Config{
		MinVersion: tls.VersionTLS13,
		// Frames are written whole; small first records bring nothing
		// on a link between two daemons.
		DynamicRecordSizingDisabled: true,
	}
}

func (l *Link) clientConfig() *tls.Config {
	cfg := l.base()
	cfg.RootCAs = l.pool
	cfg.ServerName = ServerName
	// crypto/tls sends the leaf whose CA the server names as acceptable:
	// the CA subjects differ by key.
	cfg.Certificates = l.leaves
	for _, c := range l.cas {
		cfg.NextProtos = append(cfg.NextProtos, protoPrefix+c.id)
	}
	return cfg
}

func (l *Link) serverConfig() *tls.Config {
	cfg := l.base()
	cfg.ClientAuth = tls.RequireAndVerifyClientCert
	cfg.ClientCAs = l.pool
	// The client names the CAs it trusts in its ALPN list (a client
	// amid a rotation trusts two): present the leaf of the first of this
	// node's keys it trusts, of the current key if none.
	cfg.GetCertificate = func(h *tls.ClientHelloInfo) (*tls.Certificate, error) {
		for i, c := range l.cas {
			for _, p := range h.SupportedProtos {
				if p == protoPrefix+c.id {
					return &l.leaves[i], nil
				}
			}
		}
		return &l.leaves[0], nil
	}
	return cfg
}

// Dial connects to the peer at addr and completes the TLS handshake (in
// plaintext mode, only the TCP connection). The handshake is bounded by
// ctx and by d's timeout.
func (l *Link) Dial(ctx context.Context, d *net.Dialer, addr string) (net.Conn, error) {
	c, err := d.DialContext(ctx, "tcp", addr)
	if err != nil || l.plaintext {
		return c, err
	}
	if d.Timeout > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, d.Timeout)
		defer cancel()
	}
	sc := &socket{Conn: c}
	tc := tls.Client(sc, l.clientConfig())
	if err := tc.HandshakeContext(ctx); err != nil {
		c.Close()
		if errors.Is(err, io.EOF) || errors.Is(err, syscall.ECONNRESET) {
			return nil, fmt.Errorf("the peer closed the connection during the TLS handshake "+
				"(does it run a duet with TLS, insecure_plaintext_link unset, and the same key?): %w", err)
		}
		return nil, Explain(err)
	}
	return newTLSConn(tc, sc), nil
}

// Server completes the TLS handshake of a connection accepted from a peer
// (in plaintext mode, checks that the peer does not speak TLS). The
// caller bounds it with a deadline on c. A peer that speaks the other
// mode is told so in its own: it can name the setting that differs.
func (l *Link) Server(ctx context.Context, c net.Conn) (net.Conn, error) {
	if l.plaintext {
		return plaintextServer(c)
	}
	sc := &socket{Conn: c}
	tc := tls.Server(sc, l.serverConfig())
	if err := tc.HandshakeContext(ctx); err != nil {
		var rh tls.RecordHeaderError
		if errors.As(err, &rh) && isFrame(rh.RecordHeader[:]) {
			wire.WriteFrame(c, &wire.Frame{Type: wire.TypeError, Payload: []byte(
				"this node requires TLS on the peer link and this one connected in plaintext: " +
					"set insecure_plaintext_link the same on both nodes (unset: TLS)")})
			return nil, ErrPeerPlaintext
		}
		return nil, Explain(err)
	}
	return newTLSConn(tc, sc), nil
}

// Errors of a peer in the other mode, or with another key.
var (
	ErrPeerPlaintext = errors.New("the peer connected in plaintext (insecure_plaintext_link: true there, or a duet without TLS): " +
		"this node requires TLS; set insecure_plaintext_link the same on both nodes")
	ErrPeerTLS = errors.New("the peer speaks TLS, this node has insecure_plaintext_link: true: " +
		"set insecure_plaintext_link the same on both nodes")
	ErrKeyMismatch = errors.New("the peer's certificate is not from this cluster's key: " +
		"the nodes' keys differ (key / key_file; during a rotation, previous_key / previous_key_file)")
)

// isFrame reports whether b starts like a duet frame.
func isFrame(b []byte) bool {
	return len(b) >= 4 && binary.LittleEndian.Uint32(b) == wire.Magic
}

// plaintextServer refuses a peer that opens with a TLS handshake record
// and hands back the connection with what it read still to be read.
func plaintextServer(c net.Conn) (net.Conn, error) {
	var head [3]byte
	n, err := io.ReadFull(c, head[:])
	if err != nil {
		return nil, err
	}
	if head[0] == 0x16 && head[1] == 3 { // a TLS handshake record
		// Answered with a frame: the client's TLS stack reports a
		// record that starts like one (see Explain).
		wire.WriteFrame(c, &wire.Frame{Type: wire.TypeError, Payload: []byte(ErrPeerTLS.Error())})
		return nil, ErrPeerTLS
	}
	return &prefixConn{Conn: c, r: io.MultiReader(bytes.NewReader(head[:n]), c)}, nil
}

// prefixConn is a connection whose first bytes were read already.
type prefixConn struct {
	net.Conn
	r io.Reader
}

func (p *prefixConn) Read(b []byte) (int, error) { return p.r.Read(b) }

// Explain turns a TLS failure into what differs between the nodes; other
// errors are returned as they are. A client learns that the server
// refused its certificate only at its first read: the callers pass the
// errors of their application handshake through it too.
func Explain(err error) error {
	if err == nil {
		return nil
	}
	var rh tls.RecordHeaderError
	if errors.As(err, &rh) && isFrame(rh.RecordHeader[:]) {
		return fmt.Errorf("the peer answered in plaintext (insecure_plaintext_link: true there, or a duet without TLS): " +
			"this node uses TLS; set insecure_plaintext_link the same on both nodes")
	}
	var cv *tls.CertificateVerificationError
	var ua x509.UnknownAuthorityError
	if errors.As(err, &cv) || errors.As(err, &ua) {
		return fmt.Errorf("%w (%v)", ErrKeyMismatch, err)
	}
	// crypto/tls reports a peer's alert as a net.OpError "remote error"
	// around an unexported type: only its text tells which.
	var op *net.OpError
	if errors.As(err, &op) && op.Op == "remote error" {
		switch op.Err.Error() {
		case "tls: bad certificate", "tls: unknown certificate authority", "tls: certificate required":
			return fmt.Errorf("the peer refused this node's certificate: the nodes' keys differ "+
				"(key / key_file; during a rotation, previous_key / previous_key_file) (%v)", err)
		}
	}
	return err
}
