package driver

import (
	"math/big"
	"regexp"
	"strconv"
	"testing"
)

// refChunkSize is a naive reference for parseChunkSize: a regular expression
// for the accepted spelling and arbitrary-precision arithmetic for the value,
// so it cannot overflow.
func refChunkSize(v string) (int, bool) {
	if v == "" {
		return 0, true
	}
	m := regexp.MustCompile(`^([0-9]+)(Ki|Mi|Gi)?$`).FindStringSubmatch(v)
	if m == nil {
		return 0, false
	}
	n, _ := new(big.Int).SetString(m[1], 10)
	shift := map[string]uint{"": 0, "Ki": 10, "Mi": 20, "Gi": 30}[m[2]]
	n.Lsh(n, shift)
	if n.Cmp(big.NewInt(MinChunkSize)) < 0 || n.Cmp(big.NewInt(MaxChunkSize)) > 0 {
		return 0, false
	}
	x := n.Int64()
	if x&(x-1) != 0 {
		return 0, false
	}
	return int(x), true
}

// FuzzParseChunkSize checks parseChunkSize against the reference: the same
// strings are accepted, with the same value, and nothing panics.
func FuzzParseChunkSize(f *testing.F) {
	for _, s := range []string{"", "0", "4096", "4Ki", "64Ki", "1Mi", "1024Ki", "2Mi", "48Ki", "4e3",
		"-4096", "+4Ki", " 1Mi", "1Gi", "0Gi", "99999999999999999999", "9007199254740993Ki", "Ki", "1.5Mi", "64k"} {
		f.Add(s)
	}
	for k := 12; k <= 20; k++ {
		f.Add(strconv.Itoa(1 << k))
		f.Add(strconv.Itoa(1<<k>>10) + "Ki")
	}
	f.Fuzz(func(t *testing.T, v string) {
		got, err := parseChunkSize(v)
		want, ok := refChunkSize(v)
		if (err == nil) != ok || got != want {
			t.Fatalf("parseChunkSize(%q) = %d, %v; reference %d, ok=%v", v, got, err, want, ok)
		}
		if err != nil && got != 0 {
			t.Fatalf("parseChunkSize(%q) = %d with error %v", v, got, err)
		}
	})
}
