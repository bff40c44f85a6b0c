import SwiftUI

struct BundleDetailView: View {
    @Environment(ChatModel.self) private var model

    var body: some View {
        @Bindable var model = model
        if let manifest = model.selected?.manifest {
            Form {
                Section("Model") {
                    let m = manifest.model
                    LabeledContent("Model", value: m.id)
                    LabeledContent("Family", value: m.family + (m.layerSharing ? " (layer-shared)" : ""))
                    LabeledContent("Parameters", value: String(format: "%.1f M", Double(m.params) / 1e6))
                    LabeledContent("Context", value: "\(manifest.contextLength) tokens")
                }
                Section("Artifact") {
                    Picker("Format", selection: Binding(get: { model.format ?? "" }, set: { model.selectFormat($0) })) {
                        ForEach(manifest.artifacts.filter { ChatEngines.formats.contains($0.format) }, id: \.format) { a in
                            Text("\(a.format) · \(megabytes(a.bytes))").tag(a.format)
                        }
                    }
                    if let artifact = model.format.flatMap(manifest.artifact) {
                        let q = artifact.details?.quantization ?? manifest.quantization
                        LabeledContent("Quantization", value: q.scheme)
                        LabeledContent("Weights / activations", value: "\(q.weights) / \(q.activations)")
                        LabeledContent("Runtime", value: "\(artifact.runtime) · \(artifact.backend)")
                    } else {
                        Text("No Core ML or .pte artifact in this bundle; export it with --target ios.").foregroundStyle(.red)
                    }
                }
                if let budget = model.budget {
                    BudgetSection(budget: budget)
                }
                Section {
                    switch model.phase {
                    case .verifying:
                        ProgressView("Checking sha256 of every file…", value: model.verifyProgress)
                    case .loading:
                        ProgressView("Loading the model (the first Core ML load compiles it)…")
                    default:
                        Button("Verify and load") { model.load() }
                            .disabled(model.budget == nil || model.budget?.fit == .overAvailable)
                    }
                    if let error = model.error {
                        Text(error).foregroundStyle(.red)
                    }
                }
            }
            .toolbar {
                Button("Bundles") { model.back() }.disabled(model.phase != .details)
            }
            .alert("Over this phone's budget", isPresented: $model.confirmOverBudget) {
                Button("Load anyway", role: .destructive) { model.load(force: true) }
                Button("Cancel", role: .cancel) {}
            } message: {
                if let b = model.budget {
                    Text("The bundle needs about \(megabytes(b.estimateBytes)), over its budget of \(megabytes(b.budgetBytes)) (\(Int(b.budgetFraction * 100))% of this phone's memory). iOS allows this app \(megabytes(b.memory.availableBytes)) more right now.")
                }
            }
        }
    }
}

struct BudgetSection: View {
    let budget: BudgetCheck

    var body: some View {
        Section("Memory on this iPhone") {
            switch budget.fit {
            case .fits:
                Label("Fits this phone", systemImage: "checkmark.circle").foregroundStyle(.green)
            case .overBudget:
                Label("Over budget: loading asks first", systemImage: "exclamationmark.triangle").foregroundStyle(.orange)
            case .overAvailable:
                Label("Refused: more than iOS lets this app use", systemImage: "xmark.octagon").foregroundStyle(.red)
            }
            LabeledContent(budget.estimated ? "Needs (phonekit estimate)" : "Needs (file size; no estimate)", value: megabytes(budget.estimateBytes))
            LabeledContent("Budget (\(Int(budget.budgetFraction * 100))% of RAM)", value: megabytes(budget.budgetBytes))
            LabeledContent("Physical memory", value: megabytes(budget.memory.physicalBytes))
            LabeledContent("os_proc_available_memory", value: budget.memory.availableBytes > 0 ? megabytes(budget.memory.availableBytes) : "not reported")
            if let v = budget.nearestProfile {
                LabeledContent("Exported verdict, \(v.device)", value: v.fits ? "fits" : "over")
            }
        }
    }
}
