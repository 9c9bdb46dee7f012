// loadgen drives a server with pre-serialized requests and reports latency
// percentiles as JSON. It is compiled so that, pinned to its own core, the
// load generator is not the bottleneck of the Python servers it measures.
//
// Two protocols, one driver (this file):
//   - grpc (grpc.go): llmgateway.v1.GenerationService, or anything with the
//     same method names: Generate (unary) and StreamGenerate (stream);
//   - http (http.go): POST of a JSON body to a URL (Anthropic's Messages API,
//     OpenAI's Chat Completions), the response read whole (unary) or as
//     server-sent events up to `message_stop` or `data: [DONE]` (stream).
//
// Per call it records the total latency and, for streams, the time to the
// first content chunk (and over HTTP the time to the response's first byte).
//
// Built in GOPATH mode against Debian's golang-google-grpc-dev, because this
// machine reaches no Go module proxy: see bench/build-loadgen.sh. The HTTP
// mode uses the standard library only.
package main

import (
	"encoding/json"
	"flag"
	"fmt"
	"io/ioutil"
	"math"
	"os"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

type summary struct {
	Count int     `json:"count"`
	P50   float64 `json:"p50"`
	P90   float64 `json:"p90"`
	P99   float64 `json:"p99"`
	Max   float64 `json:"max"`
	Mean  float64 `json:"mean"`
}

type result struct {
	Protocol    string         `json:"protocol"`
	Method      string         `json:"method"`
	Concurrency int            `json:"concurrency"`
	Connections int            `json:"connections"`
	Calls       int            `json:"calls"`
	Errors      int            `json:"errors"`
	ErrorCodes  map[string]int `json:"error_codes"`
	ElapsedS    float64        `json:"elapsed_s"`
	CallsPerS   float64        `json:"calls_per_s"`
	Messages    int64          `json:"messages"`
	LatencyMs   summary        `json:"latency_ms"`
	FirstByte   *summary       `json:"first_byte_ms,omitempty"`
	FirstChunk  *summary       `json:"first_chunk_ms,omitempty"`
	ChunkDelay  *summary       `json:"chunk_added_delay_ms,omitempty"`
}

func summarize(values []float64) summary {
	if len(values) == 0 {
		return summary{}
	}
	sort.Float64s(values)
	pick := func(q float64) float64 {
		i := int(math.Ceil(q*float64(len(values)))) - 1
		if i < 0 {
			i = 0
		}
		return values[i]
	}
	total := 0.0
	for _, v := range values {
		total += v
	}
	return summary{len(values), pick(0.50), pick(0.90), pick(0.99), values[len(values)-1], total / float64(len(values))}
}

func ms(d time.Duration) float64 { return float64(d.Nanoseconds()) / 1e6 }

// worker holds what one goroutine measured.
type worker struct {
	latencies, firsts, firstBytes, gaps []float64
	errors                              map[string]int
	messages                            int64
}

// timing follows one call: its start, its first content chunk and the gaps
// between content chunks (the added delay when chunks are expected every
// `interval`).
type timing struct {
	start, last time.Time
	first       time.Duration // to the first content chunk; -1 before it
	firstByte   time.Duration // to the response's first byte (HTTP); -1 unknown
	interval    time.Duration
	gaps        []float64
	record      bool
}

func newTiming(interval time.Duration, record bool) *timing {
	return &timing{start: time.Now(), first: -1, firstByte: -1, interval: interval, record: record}
}

// content notes a content chunk arriving now.
func (t *timing) content() {
	now := time.Now()
	if t.first < 0 {
		t.first = now.Sub(t.start)
	} else if t.record && t.interval > 0 {
		t.gaps = append(t.gaps, ms(now.Sub(t.last)-t.interval))
	}
	t.last = now
}

// done records a finished call in w; errCode is "" for a success.
func (w *worker) done(t *timing, messages int64, errCode string) {
	if !t.record {
		return
	}
	w.messages += messages
	if errCode != "" {
		w.errors[errCode]++
		return
	}
	w.latencies = append(w.latencies, ms(time.Since(t.start)))
	if t.first >= 0 {
		w.firsts = append(w.firsts, ms(t.first))
	}
	if t.firstByte >= 0 {
		w.firstBytes = append(w.firstBytes, ms(t.firstByte))
	}
	w.gaps = append(w.gaps, t.gaps...)
}

// caller makes one call on the slot-th connection (or client) and records it in w.
type caller func(slot int, w *worker, record bool)

type headerFlags []string

func (h *headerFlags) String() string     { return strings.Join(*h, ", ") }
func (h *headerFlags) Set(v string) error { *h = append(*h, v); return nil }

func main() {
	protocol := flag.String("protocol", "grpc", "grpc or http")
	addr := flag.String("addr", "127.0.0.1:50051", "gRPC server address")
	url := flag.String("url", "", "HTTP: the URL to POST to")
	var headers headerFlags
	flag.Var(&headers, "header", "HTTP: a request header, 'Name: value' (repeatable)")
	method := flag.String("method", "unary", "unary (gRPC Generate; HTTP whole response) or stream (StreamGenerate; SSE)")
	service := flag.String("service", "llmgateway.v1.GenerationService", "gRPC: full service name")
	requestFile := flag.String("request", "", "file holding the request: a serialized GenerateRequest (gRPC), the body (HTTP)")
	concurrency := flag.Int("c", 1, "calls in flight at once")
	conns := flag.Int("conns", 1, "gRPC: HTTP/2 connections (calls are spread over them); HTTP/1.1 uses one per call in flight")
	total := flag.Int("n", 1000, "calls to make after warm-up (0: until -d)")
	duration := flag.Duration("d", 30*time.Second, "stop starting calls after this long")
	warmup := flag.Int("warmup", 50, "calls made and discarded before measuring")
	timeout := flag.Duration("timeout", 30*time.Second, "deadline of each call")
	interval := flag.Duration("interval", 0, "expected gap between stream chunks; reports the added delay")
	ramp := flag.Duration("ramp", 0, "start the workers evenly over this long (not all at one instant)")
	flag.Parse()

	request, err := ioutil.ReadFile(*requestFile)
	if err != nil {
		fmt.Fprintln(os.Stderr, "loadgen:", err)
		os.Exit(2)
	}
	var call caller
	connections := *conns
	switch *protocol {
	case "grpc":
		call, err = grpcCaller(*addr, *service, *method, request, *conns, *timeout, *interval)
	case "http":
		connections = *concurrency
		call, err = httpCaller(*url, headers, *method, request, *concurrency, *timeout, *interval)
	default:
		err = fmt.Errorf("unknown -protocol %q", *protocol)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "loadgen:", err)
		os.Exit(2)
	}

	// Warm-up: connections, server caches and JITs (none in Python, but the
	// allocator and the SDKs' lazy imports) settle before anything counts.
	var wg sync.WaitGroup
	var next int64
	warm := &worker{errors: map[string]int{}}
	for i := 0; i < *concurrency && i < *warmup; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			for atomic.AddInt64(&next, 1) <= int64(*warmup) {
				call(i, warm, false)
			}
		}(i)
	}
	wg.Wait()

	workers := make([]*worker, *concurrency)
	next = 0
	started := time.Now()
	stopAt := started.Add(*duration)
	for i := range workers {
		workers[i] = &worker{errors: map[string]int{}}
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			if *ramp > 0 {
				time.Sleep(time.Duration(int64(*ramp) * int64(i) / int64(*concurrency)))
			}
			for time.Now().Before(stopAt) {
				if *total > 0 && atomic.AddInt64(&next, 1) > int64(*total) {
					return
				}
				call(i, workers[i], true)
			}
		}(i)
	}
	wg.Wait()
	elapsed := time.Since(started)

	out := result{Protocol: *protocol, Method: *method, Concurrency: *concurrency, Connections: connections,
		ErrorCodes: map[string]int{}, ElapsedS: elapsed.Seconds()}
	var latencies, firsts, firstBytes, gaps []float64
	for _, w := range workers {
		latencies = append(latencies, w.latencies...)
		firsts = append(firsts, w.firsts...)
		firstBytes = append(firstBytes, w.firstBytes...)
		gaps = append(gaps, w.gaps...)
		out.Messages += w.messages
		for code, n := range w.errors {
			out.ErrorCodes[code] += n
			out.Errors += n
		}
	}
	out.Calls = len(latencies)
	out.CallsPerS = float64(out.Calls) / elapsed.Seconds()
	out.LatencyMs = summarize(latencies)
	if *protocol == "http" {
		s := summarize(firstBytes)
		out.FirstByte = &s
	}
	if *method == "stream" {
		s := summarize(firsts)
		out.FirstChunk = &s
		if *interval > 0 {
			g := summarize(gaps)
			out.ChunkDelay = &g
		}
	}
	encoded, _ := json.Marshal(out)
	fmt.Println(string(encoded))
}
