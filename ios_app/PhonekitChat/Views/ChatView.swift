import SwiftUI

struct ChatView: View {
    @Environment(ChatModel.self) private var model
    @State private var input = ""

    var body: some View {
        VStack(spacing: 0) {
            Text(statusLine).font(.caption).frame(maxWidth: .infinity, alignment: .leading).padding(.horizontal)
            if let note = model.templateNote {
                Text(note).font(.caption2).foregroundStyle(.secondary).padding(.horizontal)
            }
            ScrollViewReader { proxy in
                ScrollView {
                    LazyVStack(alignment: .leading, spacing: 8) {
                        ForEach(model.messages) { message in
                            Bubble(role: message.role, text: message.content)
                        }
                        if model.generating {
                            Bubble(role: "assistant", text: model.streaming + "▍").id("streaming")
                        }
                    }
                    .padding()
                }
                .onChange(of: model.streaming) { _, _ in proxy.scrollTo("streaming", anchor: .bottom) }
            }
            if let error = model.error {
                Text(error).foregroundStyle(.red).font(.footnote).padding(.horizontal)
            }
            HStack {
                TextField("Message", text: $input, axis: .vertical).textFieldStyle(.roundedBorder)
                if model.generating {
                    Button("Stop") { model.stop() }
                } else {
                    Button("Send") {
                        model.send(input)
                        input = ""
                    }
                    .disabled(input.trimmingCharacters(in: .whitespaces).isEmpty)
                }
            }
            .padding()
        }
        .toolbar {
            Button("Close") { model.unload() }
        }
    }

    private var statusLine: String {
        var parts = [model.engineLabel ?? ""]
        if model.generating, let live = model.liveTokensPerSecond {
            parts.append(String(format: "%.1f tok/s", live))
        } else if let stats = model.lastStats {
            parts.append(String(format: "decode %.1f tok/s", stats.decodeTokensPerSecond))
            if let prefill = stats.prefillTokensPerSecond {
                parts.append(String(format: "prefill %.1f tok/s", prefill))
            }
        }
        return parts.joined(separator: " · ")
    }
}

private struct Bubble: View {
    let role: String
    let text: String

    var body: some View {
        HStack {
            if role == "user" { Spacer(minLength: 40) }
            Text(text)
                .padding(10)
                .background(role == "user" ? Color.accentColor.opacity(0.15) : Color.secondary.opacity(0.12))
                .clipShape(RoundedRectangle(cornerRadius: 12))
            if role != "user" { Spacer(minLength: 40) }
        }
    }
}
