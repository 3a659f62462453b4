import Foundation

/// The regression limits kept in Benchmarks/thresholds.json.
struct Thresholds: Decodable {
    struct Limit: Decodable {
        var benchmark: String
        var n: Int
        var baseline: String?
        var maxRatio: Double?
        /// For rows where more is better (rates).
        var minRatio: Double?
        var maxMilliseconds: Double?
        /// For memory rows (peak RSS).
        var maxMiB: Double?
        /// For counts where more is better (flows kept), and figures in their own unit (a CPU share).
        var minimum: Double?
        var maximum: Double?
    }

    var limits: [Limit]

    /// Prints a verdict per limit and returns how many were exceeded (a limit whose row is missing counts).
    static func check(_ rows: [Row], against path: String) throws -> Int {
        let thresholds = try JSONDecoder().decode(Thresholds.self, from: Data(contentsOf: URL(fileURLWithPath: path)))
        var violations = 0
        for limit in thresholds.limits {
            let label = "\(limit.benchmark) at N=\(limit.n)" + (limit.baseline.map { " vs \($0)" } ?? "")
            guard let row = rows.first(where: { $0.name == limit.benchmark && $0.n == limit.n && (limit.baseline == nil || $0.baselineName == limit.baseline) }) else {
                print("threshold MISSING: \(label): no such row was measured")
                violations += 1
                continue
            }
            var ok = true
            if limit.maxRatio != nil || limit.minRatio != nil, let baseline = row.baseline, baseline < 0.5 {
                // A baseline that is not clearly positive would make any ratio pass: that is a failure.
                print("threshold FAILED: \(label): the baseline (\(format(baseline)) ms) is not clearly positive, so the ratio means nothing")
                violations += 1
                continue
            }
            if let max = limit.maxRatio, let ratio = row.ratio {
                ok = ok && ratio <= max
                print("threshold \(ratio <= max ? "ok" : "EXCEEDED"): \(label): ratio \(String(format: "%.3f", ratio)) (limit \(max))")
            }
            if let min = limit.minRatio, let ratio = row.ratio {
                ok = ok && ratio >= min
                print("threshold \(ratio >= min ? "ok" : "EXCEEDED"): \(label): ratio \(String(format: "%.3f", ratio)) (at least \(min))")
            }
            if let max = limit.maxMilliseconds {
                ok = ok && row.epokd <= max
                print("threshold \(row.epokd <= max ? "ok" : "EXCEEDED"): \(label): \(format(row.epokd)) ms (limit \(max) ms)")
            }
            if let max = limit.maxMiB {
                ok = ok && row.unit == "MiB" && row.epokd <= max
                print("threshold \(row.unit == "MiB" && row.epokd <= max ? "ok" : "EXCEEDED"): \(label): \(format(row.epokd)) \(row.unit) (limit \(max) MiB)")
            }
            if let min = limit.minimum {
                ok = ok && row.epokd >= min
                print("threshold \(row.epokd >= min ? "ok" : "EXCEEDED"): \(label): \(format(row.epokd)) \(row.unit) (at least \(format(min)))")
            }
            if let max = limit.maximum {
                ok = ok && row.epokd <= max
                print("threshold \(row.epokd <= max ? "ok" : "EXCEEDED"): \(label): \(format(row.epokd)) \(row.unit) (at most \(format(max)))")
            }
            if !ok { violations += 1 }
        }
        print(violations == 0 ? "benchmark thresholds: all \(thresholds.limits.count) within limits" : "benchmark thresholds: \(violations) exceeded")
        return violations
    }
}
