package driver

import (
	"sort"
	"strconv"

	"google.golang.org/grpc/codes"
)

// Pagination: entries are listed in ID order and a token is the ID of the
// first entry of the next page, so a token stays valid when that entry is
// deleted between pages (listing resumes at the next larger ID) and new
// entries are picked up when their ID sorts after the token.

// pageBounds returns the half-open index range [start, end) of ids (sorted)
// for one page, and the next token ("" on the last page). maxEntries 0 means
// no limit. A negative maxEntries answers InvalidArgument and a token not in
// our ID format answers Aborted (as the spec asks for ListVolumes).
func pageBounds(ids []string, token string, maxEntries int32, validToken func(string) bool) (start, end int, next string, err error) {
	if maxEntries < 0 {
		return 0, 0, "", statusf(codes.InvalidArgument, "max_entries %d is negative", maxEntries)
	}
	if token != "" {
		if !validToken(token) {
			return 0, 0, "", statusf(codes.Aborted, "starting_token %s is not a token we issued", strconv.Quote(token))
		}
		start = sort.SearchStrings(ids, token)
	}
	end = len(ids)
	if maxEntries > 0 && end-start > int(maxEntries) {
		end = start + int(maxEntries)
		next = ids[end]
	}
	return start, end, next, nil
}
