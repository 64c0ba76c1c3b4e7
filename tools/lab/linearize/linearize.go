// Package linearize checks that a history of puts and gets on a key-value
// store is linearizable: that every operation seems to take effect at one
// instant between its call and its return, each key behaving as a single
// register. The lab records such histories from clients of the k3s stack's
// datastore across faults; a lost acknowledged write or a stale read makes
// the history fail.
//
// The search is porcupine's (github.com/anishathalye/porcupine), run on each
// key on its own.
package linearize

import (
	"fmt"
	"maps"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/anishathalye/porcupine"
)

// Kind says what an operation did.
type Kind uint8

// Operation kinds.
const (
	Put Kind = iota + 1 // write Value to Key
	Get                 // read Key
)

func (k Kind) String() string {
	switch k {
	case Put:
		return "put"
	case Get:
		return "get"
	}
	return fmt.Sprintf("kind(%d)", uint8(k))
}

// Op is one operation of a client, as the client saw it.
type Op struct {
	// Client identifies the client that issued the operation. A client
	// issues one operation at a time; in the visualization each client is
	// a row, so small numbers from 0 read best.
	Client int
	Kind   Kind
	Key    string
	// Value is the value a Put wrote. It must not be empty: the empty
	// value stands for a key that does not exist.
	Value string
	// Output is the value a Get read, or "" if the key did not exist.
	Output string
	// Call is when the client sent the request, Return when it had the
	// answer. Times with monotonic clock readings (time.Now) are compared
	// by those readings.
	Call, Return time.Time
	// Unknown marks an operation whose outcome the client does not know:
	// it timed out or failed in a way that the store may or may not have
	// carried out. Return is then ignored. An unknown Put may take effect
	// at any time after its call, or never (one whose value no Get read is
	// left out of the check); an unknown Get constrains nothing and is
	// left out too.
	Unknown bool
}

func (op Op) String() string {
	s := fmt.Sprintf("client %d %s(%q", op.Client, op.Kind, op.Key)
	switch {
	case op.Kind == Put:
		s += fmt.Sprintf(", %q)", op.Value)
	case op.Unknown:
		s += ")"
	default:
		s += ") -> " + describeValue(op.Output)
	}
	if op.Unknown {
		s += " -> unknown"
	}
	return s
}

// Check reports whether ops is linearizable. When it is not, or when the
// search did not finish within timeout (0: no limit), ok is false, info says
// which, and, unless htmlPath is empty, porcupine's visualization of the
// history and of its longest linearizable prefixes is written to htmlPath,
// to be opened in a browser. err is for a malformed history or an HTML file
// that could not be written.
func Check(ops []Op, timeout time.Duration, htmlPath string) (ok bool, info string, err error) {
	history, err := toHistory(ops)
	if err != nil {
		return false, "", err
	}
	partitions := partitionByKey(history)
	result, linInfo := porcupine.CheckOperationsVerbose(model, history, timeout)
	switch result {
	case porcupine.Ok:
		return true, fmt.Sprintf("linearizable: %d operations on %d keys", len(history), len(partitions)), nil
	case porcupine.Illegal:
		info = fmt.Sprintf("not linearizable: %d operations on %d keys; no linearization of key %s",
			len(history), len(partitions), strings.Join(illegalKeys(partitions, linInfo), ", "))
	default:
		info = fmt.Sprintf("undecided: the search of %d operations on %d keys did not finish within %v",
			len(history), len(partitions), timeout)
	}
	if htmlPath != "" {
		if err := porcupine.VisualizePath(model, linInfo, htmlPath); err != nil {
			return false, info, fmt.Errorf("linearize: writing the visualization to %s: %w", htmlPath, err)
		}
		info += "; visualization: " + htmlPath
	}
	return false, info, nil
}

// input and output are an operation's, as porcupine's model sees them.
type input struct {
	kind  Kind
	key   string
	value string // Put: the value written
}

type output struct {
	value   string // Get: the value read ("" for none)
	unknown bool   // Put: the outcome is unknown
}

// model is a register per key: the state is the key's value, "" when the
// key does not exist.
var model = porcupine.Model{
	Partition: partitionByKey,
	Init:      func() any { return "" },
	Step: func(state, in, out any) (bool, any) {
		i := in.(input)
		if i.kind == Put {
			return true, i.value
		}
		return out.(output).value == state.(string), state
	},
	DescribeOperation: func(in, out any) string {
		i, o := in.(input), out.(output)
		if i.kind == Put {
			s := fmt.Sprintf("put(%q, %q)", i.key, i.value)
			if o.unknown {
				s += " -> unknown"
			}
			return s
		}
		return fmt.Sprintf("get(%q) -> %s", i.key, describeValue(o.value))
	},
	DescribeState: func(state any) string { return describeValue(state.(string)) },
}

func describeValue(v string) string {
	if v == "" {
		return "none"
	}
	return strconv.Quote(v)
}

// partitionByKey splits a history by key, keys in sorted order (the order
// illegalKeys relies on).
func partitionByKey(history []porcupine.Operation) [][]porcupine.Operation {
	byKey := map[string][]porcupine.Operation{}
	for _, op := range history {
		k := op.Input.(input).key
		byKey[k] = append(byKey[k], op)
	}
	partitions := make([][]porcupine.Operation, 0, len(byKey))
	for _, k := range slices.Sorted(maps.Keys(byKey)) {
		partitions = append(partitions, byKey[k])
	}
	return partitions
}

// toHistory converts ops to porcupine's operations, with times in
// nanoseconds since the first call. An unknown Put returns after every other
// event: it may then be placed anywhere after its call, last included,
// where it is as if it never happened.
func toHistory(ops []Op) ([]porcupine.Operation, error) {
	if len(ops) == 0 {
		return nil, nil
	}
	start := ops[0].Call
	for _, op := range ops {
		if op.Call.Before(start) {
			start = op.Call
		}
	}
	var end int64
	for i, op := range ops {
		if err := validate(op); err != nil {
			return nil, fmt.Errorf("linearize: operation %d (%v): %w", i, op, err)
		}
		end = max(end, int64(op.Call.Sub(start)))
		if !op.Unknown {
			end = max(end, int64(op.Return.Sub(start)))
		}
	}
	// The values some get read, per key. An unknown put whose value no
	// get read is left out: if it took effect, no read saw it before the
	// next put, so leaving it out keeps every linearization valid, and it
	// can always be placed last. Each one kept multiplies the orders the
	// search may try: a campaign on btrfs with 365 unknown outcomes was
	// undecided after 3 minutes.
	read := map[string]map[string]bool{}
	for _, op := range ops {
		if op.Kind == Get && !op.Unknown {
			if read[op.Key] == nil {
				read[op.Key] = map[string]bool{}
			}
			read[op.Key][op.Output] = true
		}
	}
	history := make([]porcupine.Operation, 0, len(ops))
	for _, op := range ops {
		if op.Unknown && (op.Kind == Get || !read[op.Key][op.Value]) {
			continue
		}
		ret := end + 1
		if !op.Unknown {
			ret = int64(op.Return.Sub(start))
		}
		history = append(history, porcupine.Operation{
			ClientId: op.Client,
			Input:    input{kind: op.Kind, key: op.Key, value: op.Value},
			Call:     int64(op.Call.Sub(start)),
			Output:   output{value: op.Output, unknown: op.Unknown},
			Return:   ret,
		})
	}
	return history, nil
}

func validate(op Op) error {
	switch {
	case op.Client < 0:
		return fmt.Errorf("client %d: must be 0 or more", op.Client)
	case op.Kind != Put && op.Kind != Get:
		return fmt.Errorf("%v: must be Put or Get", op.Kind)
	case op.Kind == Put && op.Value == "":
		return fmt.Errorf("a put of the empty value, which stands for a missing key: write a non-empty value")
	case !op.Unknown && op.Return.Before(op.Call):
		return fmt.Errorf("returned at %v, before its call at %v", op.Return, op.Call)
	}
	return nil
}

// illegalKeys returns the keys, quoted, whose operations the search could
// not all linearize: those whose longest linearizable prefix misses some.
// partitions are the history's, in the order the check saw them.
func illegalKeys(partitions [][]porcupine.Operation, info porcupine.LinearizationInfo) []string {
	var bad []string
	partials := info.PartialLinearizations()
	for p, part := range partitions {
		longest := 0
		if p < len(partials) {
			for _, l := range partials[p] {
				longest = max(longest, len(l))
			}
		}
		if longest < len(part) {
			bad = append(bad, strconv.Quote(part[0].Input.(input).key))
		}
	}
	return bad
}
