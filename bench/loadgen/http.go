// The HTTP protocol: a JSON body POSTed over HTTP/1.1 keep-alive connections
// (one per call in flight, as SDK clients do), the answer read whole or as
// server-sent events.
//
// A stream ends at Anthropic's `event: message_stop`, OpenAI's
// `data: [DONE]` or the Responses API's `event: response.completed`, and is
// read to its end so the connection is reused; one that closes before its end
// is an error ("incomplete stream"). Content chunks are Anthropic's
// `content_block_delta` events, the Responses API's
// `response.output_text.delta` events and OpenAI's chunks with non-empty
// `content`. The time to first byte is the time to the
// response's status line (net/http/httptrace's GotFirstResponseByte).
package main

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"io/ioutil"
	"net"
	"net/http"
	"net/http/httptrace"
	"strings"
	"time"
)

var (
	anthropicDelta = []byte("event: content_block_delta")
	anthropicStop  = []byte("event: message_stop")
	responsesDelta = []byte("event: response.output_text.delta")
	responsesDone  = []byte("event: response.completed")
	// The same, as a data line's type.
	responsesDeltaType = []byte(`"type":"response.output_text.delta"`)
	responsesDoneType  = []byte(`"type":"response.completed"`)
	openaiDone         = []byte("data: [DONE]")
	dataPrefix         = []byte("data:")
	eventPrefix        = []byte("event:")
	contentKey         = []byte(`"content":`)
)

// openaiContent says whether an OpenAI chunk's line carries non-empty text content.
func openaiContent(line []byte) bool {
	i := bytes.Index(line, contentKey)
	if i < 0 {
		return false
	}
	rest := bytes.TrimLeft(line[i+len(contentKey):], " ")
	return len(rest) > 1 && rest[0] == '"' && rest[1] != '"'
}

func httpCaller(url string, headerLines []string, method string, body []byte, concurrency int,
	timeout, interval time.Duration) (caller, error) {
	if url == "" {
		return nil, fmt.Errorf("-protocol http needs -url")
	}
	headers := http.Header{"Content-Type": {"application/json"}}
	for _, line := range headerLines {
		name, value, ok := strings.Cut(line, ":")
		if !ok {
			return nil, fmt.Errorf("-header %q is not 'Name: value'", line)
		}
		headers.Add(strings.TrimSpace(name), strings.TrimSpace(value))
	}
	transport := &http.Transport{
		DialContext:         (&net.Dialer{Timeout: 10 * time.Second, KeepAlive: 30 * time.Second}).DialContext,
		MaxIdleConns:        concurrency * 2,
		MaxIdleConnsPerHost: concurrency * 2,
		IdleConnTimeout:     90 * time.Second,
		DisableCompression:  true,
		// HTTP/1.1 only, as the SDKs speak it to these servers.
		TLSNextProto: map[string]func(string, *tls.Conn) http.RoundTripper{},
	}
	client := &http.Client{Transport: transport}
	stream := method == "stream"

	return func(slot int, w *worker, record bool) {
		ctx, cancel := context.WithTimeout(context.Background(), timeout)
		defer cancel()
		t := newTiming(interval, record)
		trace := &httptrace.ClientTrace{GotFirstResponseByte: func() { t.firstByte = time.Since(t.start) }}
		request, err := http.NewRequestWithContext(httptrace.WithClientTrace(ctx, trace), "POST", url,
			bytes.NewReader(body))
		if err != nil {
			w.done(t, 0, "request: "+err.Error())
			return
		}
		request.Header = headers.Clone()
		response, err := client.Do(request)
		if err != nil {
			w.done(t, 0, "transport")
			return
		}
		defer response.Body.Close()
		if response.StatusCode != http.StatusOK {
			io.Copy(ioutil.Discard, response.Body)
			w.done(t, 0, fmt.Sprintf("http %d", response.StatusCode))
			return
		}
		if !stream {
			if _, err := io.Copy(ioutil.Discard, response.Body); err != nil {
				w.done(t, 0, "body")
				return
			}
			w.done(t, 0, "")
			return
		}
		var messages int64
		ended, midLine, events := false, false, false
		reader := bufio.NewReaderSize(response.Body, 32<<10)
		for {
			line, err := reader.ReadSlice('\n')
			if len(line) > 0 && !midLine && !ended {
				switch {
				case bytes.HasPrefix(line, eventPrefix):
					events = true
					messages++
					if bytes.HasPrefix(line, anthropicDelta) || bytes.HasPrefix(line, responsesDelta) {
						t.content()
					} else if bytes.HasPrefix(line, anthropicStop) || bytes.HasPrefix(line, responsesDone) {
						ended = true
					}
				case bytes.HasPrefix(line, openaiDone):
					ended = true
				case !events && bytes.HasPrefix(line, dataPrefix):
					// OpenAI's chunks: data lines with no event line (some servers
					// send the Responses API's events so too: their type says).
					messages++
					if openaiContent(line) || bytes.Contains(line, responsesDeltaType) {
						t.content()
					} else if bytes.Contains(line, responsesDoneType) {
						ended = true
					}
				}
			}
			midLine = err == bufio.ErrBufferFull
			if err == bufio.ErrBufferFull {
				continue
			}
			if err == io.EOF {
				break
			}
			if err != nil {
				w.done(t, messages, "body")
				return
			}
		}
		if !ended {
			w.done(t, messages, "incomplete stream")
			return
		}
		w.done(t, messages, "")
	}, nil
}
