import Foundation
import NetnsLab
#if canImport(Glibc)
import Glibc
#endif

/// Wall-clock time of `body`, in milliseconds.
func milliseconds(_ body: () throws -> Void) rethrows -> Double {
    let start = DispatchTime.now().uptimeNanoseconds
    try body()
    return Double(DispatchTime.now().uptimeNanoseconds - start) / 1e6
}

/// The median of `runs` measurements; `prepare` runs untimed before each one.
func median(_ runs: Int, prepare: () throws -> Void = {}, _ body: () throws -> Void) rethrows -> Double {
    var samples: [Double] = []
    for _ in 0..<runs {
        try prepare()
        samples.append(try milliseconds(body))
    }
    return median(of: samples)
}

func median(of samples: [Double]) -> Double {
    let sorted = samples.sorted()
    return sorted.count % 2 == 1 ? sorted[sorted.count / 2] : (sorted[sorted.count / 2 - 1] + sorted[sorted.count / 2]) / 2
}

/// The wall time of `command` as a process, timed inside the namespace by the shell that starts it (bash's
/// `time`, millisecond resolution), so that the cost of entering the namespace is not in the figure and nothing
/// has to be subtracted from it.
func processTime(in ns: NetworkNamespace, _ command: [String], check: Bool = true) throws -> Double {
    let quoted = command.map { "'" + $0.replacingOccurrences(of: "'", with: "'\\''") + "'" }.joined(separator: " ")
    let result = try ns.exec(["bash", "-c", "TIMEFORMAT=%3R; { time \(quoted) >/dev/null 2>&1; } 2>&1; status=$?; [ \(check ? "$status" : "0") -eq 0 ]"])
    guard let seconds = result.output.split(separator: "\n").last.flatMap({ Double($0.trimmingCharacters(in: .whitespaces)) }) else {
        throw LabError.commandFailed(command.joined(separator: " "), result.status, "no time in \(result.output)")
    }
    return seconds * 1000
}

/// A median with the least and the greatest of the samples it was taken from.
struct Measured {
    var median: Double
    var least: Double
    var greatest: Double

    init(_ samples: [Double]) {
        median = samples.isEmpty ? 0 : epokd_bench.median(of: samples)
        least = samples.min() ?? 0
        greatest = samples.max() ?? 0
    }

    /// Each figure divided by `divisor` (a rate in thousands, say).
    func divided(by divisor: Double) -> Measured {
        var result = self
        result.median = median / divisor
        result.least = least / divisor
        result.greatest = greatest / divisor
        return result
    }
}

/// The wall times of `command` as a process (see `processTime`); `prepare` runs untimed before each run.
func processSamples(_ runs: Int, in ns: NetworkNamespace, prepare: () throws -> Void = {}, _ command: [String], check: Bool = true) throws -> Measured {
    var samples: [Double] = []
    for _ in 0..<runs {
        try prepare()
        samples.append(try processTime(in: ns, command, check: check))
    }
    return Measured(samples)
}

/// The median wall time of `command` as a process (see `processSamples`).
func processMedian(_ runs: Int, in ns: NetworkNamespace, prepare: () throws -> Void = {}, _ command: [String], check: Bool = true) throws -> Double {
    try processSamples(runs, in: ns, prepare: prepare, command, check: check).median
}

/// The medians of measurements taken in turn, one of each per run, so that a spell in which the shared machine
/// runs slower falls on every side of a ratio rather than on one.
func interleavedMedians(_ runs: Int, _ measurements: [() throws -> Double]) throws -> [Double] {
    var samples = Array(repeating: [Double](), count: measurements.count)
    for _ in 0..<runs {
        for (i, measure) in measurements.enumerated() { samples[i].append(try measure()) }
    }
    return samples.map { median(of: $0) }
}

/// One line of the results table.
struct Row {
    var name: String
    var n: Int
    var epokd: Double
    var baselineName: String?
    var baseline: Double?
    var unit = "ms"
    /// The least and the greatest sample behind `epokd` and `baseline`, where they are medians of several.
    var spread: ClosedRange<Double>?
    var baselineSpread: ClosedRange<Double>?

    var ratio: Double? { baseline.map { epokd / $0 } }
}

extension Row {
    init(name: String, n: Int, epokd: Measured, baselineName: String? = nil, baseline: Measured? = nil, unit: String = "ms") {
        self.init(name: name, n: n, epokd: epokd.median, baselineName: baselineName, baseline: baseline?.median, unit: unit,
                  spread: epokd.least...epokd.greatest, baselineSpread: baseline.map { $0.least...$0.greatest })
    }
}

func format(_ v: Double) -> String {
    v >= 100 ? String(format: "%.0f", v) : v >= 1 ? String(format: "%.2f", v) : String(format: "%.4f", v)
}

func printTable(_ rows: [Row]) {
    let header = ["benchmark", "N", "epokd median (min–max)", "baseline", "baseline median (min–max)", "epokd / baseline"]
    var lines = [header]
    for r in rows {
        func figure(_ value: Double, _ spread: ClosedRange<Double>?) -> String {
            var text = format(value) + " " + r.unit
            // A spread is shown where there is one (not for a single sample, nor for equal ones).
            if let spread, spread.lowerBound < spread.upperBound {
                text += " (" + format(spread.lowerBound) + "–" + format(spread.upperBound) + ")"
            }
            return text
        }
        lines.append([r.name, String(r.n), figure(r.epokd, r.spread), r.baselineName ?? "-",
                      r.baseline.map { figure($0, r.baselineSpread) } ?? "-", r.ratio.map { String(format: "%.3f", $0) } ?? "-"])
    }
    let widths = (0..<header.count).map { c in lines.map { $0[c].count }.max()! }
    for (i, l) in lines.enumerated() {
        print("| " + l.enumerated().map { $0.element.padding(toLength: widths[$0.offset], withPad: " ", startingAt: 0) }.joined(separator: " | ") + " |")
        if i == 0 { print("|" + widths.map { String(repeating: "-", count: $0 + 2) }.joined(separator: "|") + "|") }
    }
}

/// The status of a plain HTTP GET on loopback, or nil if nothing answered.
func httpStatus(port: Int, path: String) -> Int? { httpGet(port: port, path: path)?.0 }

/// Clients that scrape /metrics back to back on threads of their own until `finish`.
final class ScrapeStorm: @unchecked Sendable {
    private let lock = NSLock()
    private var stopped = false
    private var answered = 0
    private let group = DispatchGroup()

    init(port: Int, clients: Int) {
        for _ in 0..<clients {
            group.enter()
            Thread { [self] in
                while !lock.withLock({ stopped }) {
                    if httpStatus(port: port, path: "/metrics") == 200 { lock.withLock { answered += 1 } }
                }
                group.leave()
            }.start()
        }
        // Let every client have a scrape in flight before anything is measured.
        while lock.withLock({ answered }) < clients { usleep(1000) }
    }

    /// Stops the clients and returns how many scrapes were answered.
    func finish() -> Int {
        lock.withLock { stopped = true }
        group.wait()
        return lock.withLock { answered }
    }
}
